//! Self-measurement at start: what this host brings to the mesh.

use std::time::{Duration, Instant};

use serde::Serialize;

/// What a node measured about its own host.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SelfMeasurement {
    /// Logical CPUs this process may use.
    pub cores: u32,
    /// Memory available to new work (`MemAvailable`), in bytes.
    pub memory_bytes: u64,
    /// f32 matrix multiply speed over all cores, in GFLOP/s.
    pub gflops: f32,
    /// The fogmesh version.
    pub version: String,
}

/// The fogmesh version string peers exchange.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl SelfMeasurement {
    /// Measures this host; the matmul probe runs for about `probe` (≥ one
    /// multiply).
    pub fn measure(probe: Duration) -> Self {
        Self::with_speed(matmul_gflops(probe))
    }

    /// Measures this host's cores and memory, and takes its speed as
    /// `gflops` (known beforehand: no probe).
    pub fn with_speed(gflops: f32) -> Self {
        SelfMeasurement {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: available_memory().unwrap_or(0),
            gflops,
            version: VERSION.to_string(),
        }
    }
}

/// A compute speed in GFLOP/s: a finite number above 0, at most a million.
pub fn parse_gflops(s: &str) -> Result<f32, String> {
    let g: f32 = s.trim().parse().map_err(|_| format!("not a number of GFLOP/s: {s:?}"))?;
    if g.is_finite() && g > 0.0 && g <= 1e6 {
        Ok(g)
    } else {
        Err(format!("a speed must be above 0 and at most 1000000 GFLOP/s, not {s}"))
    }
}

/// A memory size: bytes, or a number with a unit (`80MiB`, `2GiB`, `512k`,
/// `1.5G`; powers of 1024 whether or not the unit says `i`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (try 80MiB, 2GiB or a number of bytes)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB or TiB)")),
    };
    let bytes = n * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err(format!("{s:?} is not a usable memory size"));
    }
    Ok(bytes as u64)
}

/// `MemAvailable` from `/proc/meminfo` (Linux), in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Times repeated 256×256 f32 matrix products (candle's CPU matmul, the
/// kernel family the engine's f32 paths use) for about `budget`.
pub fn matmul_gflops(budget: Duration) -> f32 {
    use candle_core::{Device, Tensor};
    const N: usize = 256;
    let dev = Device::Cpu;
    let data: Vec<f32> = (0..N * N).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
    let (Ok(a), Ok(b)) = (Tensor::from_slice(&data, (N, N), &dev), Tensor::from_slice(&data, (N, N), &dev)) else {
        return 0.0;
    };
    // One warm-up product, then as many as fit the budget.
    if a.matmul(&b).is_err() {
        return 0.0;
    }
    let start = Instant::now();
    let mut runs = 0u32;
    while runs == 0 || start.elapsed() < budget {
        if a.matmul(&b).is_err() {
            return 0.0;
        }
        runs += 1;
    }
    let flops = 2.0 * (N * N * N) as f64 * runs as f64;
    (flops / start.elapsed().as_secs_f64() / 1e9) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_meminfo(text), Some(2048 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn sizes_take_units_and_refuse_nonsense() {
        assert_eq!(parse_size("80MiB"), Ok(80 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2 gb"), Ok(2 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "lots", "-1MiB", "12 parsecs", "0", "1e30"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn speeds_are_positive_finite_numbers() {
        assert_eq!(parse_gflops("50"), Ok(50.0));
        assert_eq!(parse_gflops(" 2.5 "), Ok(2.5));
        for bad in ["", "fast", "0", "-3", "NaN", "inf", "1e7"] {
            assert!(parse_gflops(bad).is_err(), "{bad:?}");
        }
        assert_eq!(SelfMeasurement::with_speed(7.0).gflops, 7.0);
    }

    #[test]
    fn measures_something() {
        let m = SelfMeasurement::measure(Duration::from_millis(20));
        assert!(m.cores >= 1);
        assert!(m.gflops > 0.0);
        assert_eq!(m.version, VERSION);
    }
}
