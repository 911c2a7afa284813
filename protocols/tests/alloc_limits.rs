//! Decoders never allocate past the configured limits, whatever a header
//! claims: a counting allocator records the largest single allocation made
//! while decoding hostile inputs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fogmesh_protocols::*;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only recording sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns the largest allocation it made.
fn largest_during(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    f();
    LARGEST.load(Ordering::Relaxed)
}

#[test]
fn hostile_inputs_stay_under_the_limits() {
    let limits = Limits { max_frame: 64 << 10, max_decoded: 1 << 20 };
    // 1. An activation header claiming 2^32 x 2^32 values, no body.
    let mut act = vec![b'A', 1, 0, 0];
    act.extend_from_slice(&u32::MAX.to_le_bytes());
    act.extend_from_slice(&u32::MAX.to_le_bytes());
    act.extend_from_slice(&0u32.to_le_bytes());
    // 2. A zstd bomb: 256 MiB of zeros behind a header claiming 1 MiB of f32.
    let bomb_body = zstd::bulk::compress(&vec![0u8; 256 << 20], 1).unwrap();
    let mut bomb = vec![b'A', 1, 0, 1];
    bomb.extend_from_slice(&256u32.to_le_bytes());
    bomb.extend_from_slice(&1024u32.to_le_bytes());
    bomb.extend_from_slice(&(bomb_body.len() as u32).to_le_bytes());
    bomb.extend_from_slice(&bomb_body);
    // 3. A frame header announcing 4 GiB.
    let mut frame = Vec::from(MAGIC);
    frame.extend_from_slice(&VERSION.to_le_bytes());
    frame.extend_from_slice(&(MessageKind::WeightChunkReply as u16).to_le_bytes());
    frame.extend_from_slice(&u32::MAX.to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    // 4. A valid CRC around a payload whose archive claims a huge vector.
    let mut lying = Vec::new();
    let mut payload = vec![0xffu8; 4096];
    payload[4090..].copy_from_slice(&[0x7f, 0xff, 0xff, 0xff, 0, 0]);
    write_frame(MessageKind::WeightChunkReply, &payload, &limits, &mut lying).unwrap();

    let mut codec = ActivationCodec::new();
    let mut out = Vec::new();
    let peak = largest_during(|| {
        assert!(codec.decode(&act, &limits, &mut out).is_err());
        assert!(codec.decode(&bomb, &limits, &mut out).is_err());
        assert!(read_message(&frame, &limits).is_err());
        assert!(read_message(&lying, &limits).is_err());
    });
    assert!(peak <= limits.max_decoded + limits.max_frame, "largest allocation {peak} bytes");
}
