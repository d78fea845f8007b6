//! A counting global allocator: the bytes live on the heap, counted only while switched on
//! (the idle-connection benchmark), so the other parts pay one relaxed load per allocation.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// The system allocator, counting live bytes while [`set_counting`] is on.
pub struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicI64 = AtomicI64::new(0);

/// Switches counting on or off.
pub fn set_counting(on: bool) {
    ON.store(on, Ordering::SeqCst);
}

/// Bytes allocated and not freed while counting was on (frees of blocks allocated before
/// count too, so measure between two calls with counting on throughout).
pub fn live_bytes() -> i64 {
    LIVE.load(Ordering::SeqCst)
}

fn add(n: usize) {
    if ON.load(Ordering::Relaxed) {
        LIVE.fetch_add(n as i64, Ordering::Relaxed);
    }
}

fn sub(n: usize) {
    if ON.load(Ordering::Relaxed) {
        LIVE.fetch_sub(n as i64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the only additions are
// counter updates, which do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sub(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        sub(layout.size());
        add(new_size);
        // SAFETY: as for `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
