//! The global allocator: jemalloc, with a small per-worker cache of
//! Pingora's 64 KiB body buffers in front of it.
//!
//! For every upstream response, pingora-core's HTTP/1 client allocates a
//! fresh 64 KiB buffer for the body (`BodyReader::prepare_buf`, a private
//! size) and frees it with the session, even when the body is 13 bytes.
//! jemalloc's thread cache stops at 32 KiB (its `tcache_max` cannot go
//! higher with 4 KiB pages), so each of these goes to the arena: a large
//! extent taken, split and registered, then given back and coalesced
//! (its cost is in `bench/notes.md`).
//!
//! This allocator keeps up to [`SLOTS`] such blocks per worker thread and
//! hands them out again: a push and a pop on a thread-local array. Every
//! block comes from jemalloc and is still a valid jemalloc block, so
//! `realloc` and `free` of any block stay jemalloc's. Only threads that
//! opt in ([`enable_on_this_thread`], the proxy workers) cache, and their
//! cache is emptied when the thread ends, so nothing is kept past a
//! thread's life.
//!
//! A global allocator is `unsafe` by nature: this module is the second
//! place the workspace's `unsafe_code = "deny"` is lifted, each block with
//! its reason.
//!
//! Upstream change that would delete this file: pingora-core's HTTP/1
//! client keeping its body buffer with the session (or sizing it to the
//! body), instead of a fresh 64 KiB allocation per response.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ptr;

use tikv_jemallocator::Jemalloc;

/// The one size cached: pingora-core's body buffer (`BODY_BUFFER_SIZE`).
pub const BLOCK: usize = 64 * 1024;
/// Blocks kept per thread, at most (1 MiB).
pub const SLOTS: usize = 16;
/// Blocks served from the cache are only guaranteed jemalloc's minimum
/// alignment: larger alignments go to jemalloc.
const ALIGN: usize = 16;

struct Cache {
    enabled: Cell<bool>,
    len: Cell<usize>,
    blocks: [Cell<*mut u8>; SLOTS],
}

thread_local! {
    // `const` and no destructor: reading it never allocates and never
    // registers anything, so it is safe inside the allocator.
    static CACHE: Cache = const {
        Cache {
            enabled: Cell::new(false),
            len: Cell::new(0),
            blocks: [const { Cell::new(ptr::null_mut()) }; SLOTS],
        }
    };
    // Touched once by `enable_on_this_thread`, outside the allocator: its
    // destructor gives the cached blocks back to jemalloc.
    static DRAIN: Drain = const { Drain };
}

struct Drain;

impl Drop for Drain {
    fn drop(&mut self) {
        let _ = CACHE.try_with(|cache| {
            cache.enabled.set(false);
            while let Some(block) = cache.pop() {
                // SAFETY: every cached block came from `Jemalloc.alloc`
                // with this layout (see `dealloc`).
                unsafe { Jemalloc.dealloc(block, block_layout()) };
            }
        });
    }
}

impl Cache {
    fn pop(&self) -> Option<*mut u8> {
        let len = self.len.get();
        if len == 0 {
            return None;
        }
        self.len.set(len - 1);
        Some(self.blocks[len - 1].replace(ptr::null_mut()))
    }

    fn push(&self, block: *mut u8) -> bool {
        let len = self.len.get();
        if !self.enabled.get() || len == SLOTS {
            return false;
        }
        self.blocks[len].set(block);
        self.len.set(len + 1);
        true
    }
}

fn block_layout() -> Layout {
    // 64 KiB with alignment 16 is a valid layout.
    Layout::from_size_align(BLOCK, ALIGN).unwrap_or_else(|_| unreachable!())
}

fn cacheable(layout: &Layout) -> bool {
    layout.size() == BLOCK && layout.align() <= ALIGN
}

/// Lets the calling thread keep freed body buffers for its next
/// responses. Idempotent; the cache is emptied when the thread ends.
pub fn enable_on_this_thread() {
    let _ = CACHE.try_with(|cache| {
        if !cache.enabled.get() {
            cache.enabled.set(true);
            DRAIN.with(|_| {});
        }
    });
}

/// How many blocks the calling thread holds.
#[cfg(test)]
fn cached_here() -> usize {
    CACHE.try_with(|cache| cache.len.get()).unwrap_or(0)
}

/// jemalloc with the body-buffer cache in front.
pub struct Allocator;

// SAFETY: every call is forwarded to jemalloc, except that blocks of
// exactly `BLOCK` bytes (alignment at most `ALIGN`) may be kept on free and
// returned by a later `alloc` of the same layout class. A kept block is a
// live jemalloc allocation of `BLOCK` bytes aligned to at least `ALIGN`, so
// it satisfies such an `alloc`, and handing it later to jemalloc's
// `realloc` or `dealloc` (with `BLOCK` as its size) is valid.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if cacheable(&layout)
            && let Ok(Some(block)) = CACHE.try_with(Cache::pop)
        {
            return block;
        }
        // SAFETY: the caller's contract for `layout`, passed on.
        unsafe { Jemalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above; zeroed memory is jemalloc's to give.
        unsafe { Jemalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if cacheable(&layout) && CACHE.try_with(|cache| cache.push(ptr)) == Ok(true) {
            return;
        }
        // SAFETY: `ptr` was allocated by this allocator with `layout`, so
        // by jemalloc with a layout of the same size.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`: `ptr` is a jemalloc block of
        // `layout.size()` bytes.
        unsafe { Jemalloc.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Layout {
        block_layout()
    }

    #[test]
    fn a_freed_block_is_handed_out_again_on_an_enabled_thread_only() {
        std::thread::spawn(|| unsafe {
            let a = Allocator.alloc(block());
            assert!(!a.is_null());
            Allocator.dealloc(a, block());
            assert_eq!(cached_here(), 0, "not enabled: freed to jemalloc");

            enable_on_this_thread();
            let b = Allocator.alloc(block());
            b.write_bytes(7, BLOCK);
            Allocator.dealloc(b, block());
            assert_eq!(cached_here(), 1);
            let c = Allocator.alloc(block());
            assert_eq!(c, b, "the same block, from the cache");
            assert_eq!(cached_here(), 0);
            Allocator.dealloc(c, block());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn other_sizes_and_alignments_are_never_cached() {
        std::thread::spawn(|| unsafe {
            enable_on_this_thread();
            for layout in [
                Layout::from_size_align(BLOCK - 1, 1).unwrap(),
                Layout::from_size_align(BLOCK + 1, 1).unwrap(),
                Layout::from_size_align(BLOCK, 64).unwrap(),
                Layout::from_size_align(4096, 8).unwrap(),
            ] {
                let p = Allocator.alloc(layout);
                assert_eq!(p as usize % layout.align(), 0);
                Allocator.dealloc(p, layout);
                assert_eq!(cached_here(), 0, "{layout:?}");
            }
            // A cached block is not handed to a request for more alignment.
            let p = Allocator.alloc(block());
            Allocator.dealloc(p, block());
            assert_eq!(cached_here(), 1);
            let aligned = Layout::from_size_align(BLOCK, 4096).unwrap();
            let q = Allocator.alloc(aligned);
            assert_eq!(q as usize % 4096, 0);
            assert_eq!(cached_here(), 1);
            Allocator.dealloc(q, aligned);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_cache_is_bounded_and_a_cached_block_can_be_reallocated() {
        std::thread::spawn(|| unsafe {
            enable_on_this_thread();
            let blocks: Vec<_> = (0..SLOTS + 4).map(|_| Allocator.alloc(block())).collect();
            for &b in &blocks {
                Allocator.dealloc(b, block());
            }
            assert_eq!(cached_here(), SLOTS, "the rest went back to jemalloc");
            let p = Allocator.alloc(block());
            p.write_bytes(1, BLOCK);
            let grown = Allocator.realloc(p, block(), 2 * BLOCK);
            assert!(!grown.is_null());
            assert_eq!(*grown.add(BLOCK - 1), 1, "contents kept");
            Allocator.dealloc(grown, Layout::from_size_align(2 * BLOCK, ALIGN).unwrap());
            assert_eq!(cached_here(), SLOTS - 1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_byte_array_of_the_block_size_shares_the_cache() {
        std::thread::spawn(|| unsafe {
            enable_on_this_thread();
            // `BytesMut::with_capacity(64 KiB)` asks for a byte array.
            let layout = block();
            let first = Allocator.alloc(layout);
            Allocator.dealloc(first, layout);
            let again = Allocator.alloc(Layout::array::<u8>(BLOCK).unwrap());
            assert_eq!(again, first);
            Allocator.dealloc(again, Layout::array::<u8>(BLOCK).unwrap());
        })
        .join()
        .unwrap();
    }
}
