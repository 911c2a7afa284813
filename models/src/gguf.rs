//! A bounded GGUF reader.
//!
//! Parses the header, the metadata and the tensor directory of a GGUF file
//! (versions 2 and 3) without trusting a single count or length in it: every
//! length is checked against the bytes left in the file and against hard caps
//! before anything is allocated, so a hostile or truncated file gives an error
//! naming the problem, never a panic or a huge allocation. Tensor data is read
//! later, one tensor at a time, so a shard holds only the bytes it needs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;

use crate::error::{ModelError, Result, gguf_err};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Longest string (key, value or tensor name) accepted.
const MAX_STRING: u64 = 16 << 20;
/// Most metadata entries or tensors accepted.
const MAX_ENTRIES: u64 = 1 << 20;
/// Most elements in one metadata array.
const MAX_ARRAY: u64 = 1 << 24;
/// Deepest nesting of metadata arrays.
const MAX_DEPTH: usize = 2;
/// Most dimensions of one tensor.
const MAX_DIMS: u32 = 4;
/// Most elements of one tensor (2^40).
const MAX_ELEMENTS: u64 = 1 << 40;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float32`
    F32(f32),
    /// `float64`
    F64(f64),
    /// `bool`
    Bool(bool),
    /// UTF-8 `string`
    String(String),
    /// An array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v.into()),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<usize>,
    /// Element type.
    pub dtype: GgmlDType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// The parsed directory of a GGUF file: metadata and tensor locations.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Total size of the file in bytes.
    pub file_size: u64,
}

/// Maps a GGUF tensor type number to candle's dtype.
pub fn dtype_from_u32(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Maps candle's dtype to its GGUF tensor type number.
pub fn dtype_to_u32(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// A reader that knows how many bytes are left and refuses lengths past them.
struct Bounded<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Bounded<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        if self.remaining() < N as u64 {
            return Err(gguf_err(format!(
                "file truncated while reading {what} at offset {}",
                self.pos
            )));
        }
        self.inner
            .read_exact(&mut b)
            .map_err(|e| gguf_err(format!("reading {what} at offset {}: {e}", self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A length field (u64 in v3, u32 in v2).
    fn len_field(&mut self, v2: bool, what: &str) -> Result<u64> {
        if v2 {
            Ok(self.u32(what)?.into())
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, v2: bool, what: &str) -> Result<String> {
        let n = self.len_field(v2, what)?;
        if n > MAX_STRING || n > self.remaining() {
            return Err(gguf_err(format!(
                "{what}: string length {n} at offset {} exceeds the {} bytes left",
                self.pos,
                self.remaining()
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| gguf_err(format!("reading {what}: {e}")))?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| gguf_err(format!("{what}: string is not UTF-8")))
    }

    fn value(&mut self, ty: u32, v2: bool, depth: usize, what: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.bytes(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => match u8::from_le_bytes(self.bytes(what)?) {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(gguf_err(format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(v2, what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(gguf_err(format!("{what}: arrays nested deeper than {MAX_DEPTH}")));
                }
                let elem_ty = self.u32(what)?;
                let n = self.len_field(v2, what)?;
                // Every element takes at least one byte, so the count cannot
                // exceed what is left in the file.
                if n > MAX_ARRAY || n > self.remaining() {
                    return Err(gguf_err(format!(
                        "{what}: array of {n} elements at offset {} does not fit the {} bytes left",
                        self.pos,
                        self.remaining()
                    )));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, v2, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
            t => return Err(gguf_err(format!("{what}: unknown value type {t}"))),
        })
    }
}

impl Gguf {
    /// Reads the directory of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io { path: PathBuf::from(path), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Self::parse(BufReader::new(file), len)
    }

    /// Parses a GGUF directory from `reader`, which holds `len` bytes in all.
    pub fn parse<R: Read>(reader: R, len: u64) -> Result<Self> {
        let mut r = Bounded { inner: reader, pos: 0, len };
        let magic: [u8; 4] = r.bytes("magic")?;
        if magic != GGUF_MAGIC {
            return Err(gguf_err(format!("bad magic {magic:02x?}: not a GGUF file")));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(gguf_err(format!("unsupported GGUF version {version} (2 and 3 are)")));
        }
        let v2 = version == 2;
        let n_tensors = r.len_field(v2, "tensor count")?;
        let n_kv = r.len_field(v2, "metadata count")?;
        if n_tensors > MAX_ENTRIES || n_kv > MAX_ENTRIES {
            return Err(gguf_err(format!(
                "absurd counts: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(v2, &format!("metadata key #{i}"))?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, v2, 0, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(gguf_err(format!("duplicate metadata key `{key}`")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(gguf_err(format!("general.alignment {v:?} is not a power of two"))),
            },
        };
        let mut infos = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(v2, &format!("tensor #{i} name"))?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(ModelError::Tensor {
                    name,
                    problem: format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            let mut elements: u64 = 1;
            for _ in 0..n_dims {
                let d = r.len_field(v2, &name)?;
                elements = elements.checked_mul(d).filter(|&e| e <= MAX_ELEMENTS).ok_or_else(|| {
                    ModelError::Tensor { name: name.clone(), problem: "absurd dimensions".into() }
                })?;
                dims.push(d);
            }
            if elements == 0 {
                return Err(ModelError::Tensor { name, problem: "a dimension is zero".into() });
            }
            let ty = r.u32(&name)?;
            let dtype = dtype_from_u32(ty).ok_or_else(|| ModelError::Tensor {
                name: name.clone(),
                problem: format!("unknown tensor type {ty}"),
            })?;
            let block = dtype.block_size() as u64;
            if dims[0] % block != 0 {
                return Err(ModelError::Tensor {
                    name,
                    problem: format!(
                        "row length {} is not a multiple of the {dtype:?} block size {block}",
                        dims[0]
                    ),
                });
            }
            let size = elements / block * dtype.type_size() as u64;
            let offset = r.u64(&name)?;
            if offset % alignment != 0 {
                return Err(ModelError::Tensor {
                    name,
                    problem: format!("data offset {offset} is not aligned to {alignment}"),
                });
            }
            let dims = dims.into_iter().map(|d| d as usize).collect();
            infos.push(TensorInfo { name, dims, dtype, offset, size });
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for mut t in infos {
            let abs = data_start.checked_add(t.offset);
            let end = abs.and_then(|a| a.checked_add(t.size));
            match (abs, end) {
                (Some(abs), Some(end)) if end <= len => t.offset = abs,
                _ => {
                    return Err(ModelError::Tensor {
                        problem: format!(
                            "data ({} bytes at offset {}) runs past the end of the file ({len} bytes): truncated?",
                            t.size, t.offset
                        ),
                        name: t.name,
                    });
                }
            }
            let name = t.name.clone();
            if tensors.insert(name.clone(), t).is_some() {
                return Err(ModelError::Tensor { name, problem: "appears twice".into() });
            }
        }
        Ok(Gguf { version, metadata, tensors, file_size: len })
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: "missing".into(),
        })
    }

    /// A metadata value as an unsigned integer.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.as_u64().and_then(|v| usize::try_from(v).ok()).ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: format!("expected a non-negative integer, found {v:?}"),
        })
    }

    /// A metadata value as a float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: format!("expected a number, found {v:?}"),
        })
    }

    /// A metadata value as a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: format!("expected a string, found {}", kind(v)),
        })
    }

    /// A metadata value as an array.
    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        let v = self.get(key)?;
        v.as_array().ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            problem: format!("expected an array, found {}", kind(v)),
        })
    }

    /// A tensor's directory entry, or an error naming the missing tensor.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| ModelError::Tensor {
            name: name.into(),
            problem: "missing from the file".into(),
        })
    }

    /// Reads one tensor's raw bytes from `file` (which must be the parsed file).
    pub fn read_tensor<R: Read + Seek>(&self, file: &mut R, info: &TensorInfo) -> Result<Vec<u8>> {
        let err = |e: std::io::Error| ModelError::Tensor {
            name: info.name.clone(),
            problem: format!("reading data: {e}"),
        };
        file.seek(SeekFrom::Start(info.offset)).map_err(err)?;
        let size = usize::try_from(info.size).map_err(|_| ModelError::Tensor {
            name: info.name.clone(),
            problem: "too large for this platform".into(),
        })?;
        let mut buf = vec![0u8; size];
        file.read_exact(&mut buf).map_err(err)?;
        Ok(buf)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Bool(_) => "a bool",
        Value::F32(_) | Value::F64(_) => "a float",
        _ => "an integer",
    }
}

/// A tensor to write with [`write_gguf`].
#[derive(Debug, Clone)]
pub struct TensorData {
    /// Name.
    pub name: String,
    /// Dimensions in GGUF order (innermost first).
    pub dims: Vec<usize>,
    /// Element type.
    pub dtype: GgmlDType,
    /// Encoded bytes.
    pub data: Vec<u8>,
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            let elem = items.first().map_or(4, value_type);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                write_value(out, i);
            }
        }
    }
}

/// Encodes a GGUF v3 file (32-byte alignment). Used to build test models and
/// fuzz seeds; arrays must hold values of one type.
pub fn write_gguf(metadata: &[(String, Value)], tensors: &[TensorData]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&GGUF_MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        write_str(&mut out, k);
        out.extend_from_slice(&value_type(v).to_le_bytes());
        write_value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        write_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&dtype_to_u32(t.dtype).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(out.len().div_ceil(32) * 32, 0);
    }
    out
}
