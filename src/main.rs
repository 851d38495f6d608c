//! The `keygate` binary: parse the command line, set up logging, run, map to an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = keygate::cli::Cli::parse();
    keygate::trim::install(collect_freed);
    // rustls warns once per handshake about what clients send (an IP address as SNI, say):
    // a client must not decide how much keygate logs. Failed handshakes are logged at debug.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=off"));
    // Colour only for a person at a terminal: files, pipes and log shippers get plain bytes.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if keygate::cli::json_diagnostics(&cli) {
        keygate::cli::JSON_DIAGNOSTICS.store(true, std::sync::atomic::Ordering::Relaxed);
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
    keygate::cli::run(cli)
}

// glibc malloc showed up at ~7% of the request path's CPU; mimalloc's per-thread heaps fit the
// thread-per-core workers.
#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// mimalloc, asked for plain allocations whenever those are aligned enough.
///
/// The `mimalloc` crate passes every request to `mi_malloc_aligned`. In mimalloc 3 that
/// leaves its fast path whenever the current page's free list is empty or the size is over
/// 1 KiB, and then over-allocates by the alignment and aligns inside the block: about 150
/// instructions a time, and an 8 KiB buffer landing in the 10 KiB size class. Plain
/// `mi_malloc` blocks are word multiples on at least 16-byte aligned page starts, and for
/// sizes that are multiples of 16 the blocks are too, which is what `std`'s own allocator
/// relies on malloc for.
struct Mimalloc;

/// True when a plain mimalloc block of `size` bytes is always aligned to `align`.
fn plain(size: usize, align: usize) -> bool {
    align <= 8 || (align == 16 && size.is_multiple_of(16))
}

// SAFETY: every pointer comes from mimalloc and goes back to it (`mi_free` takes blocks from
// both the plain and the aligned calls); alignment is as `plain` says or mimalloc's aligned
// calls guarantee.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: `layout` has a non-zero size (GlobalAlloc's contract).
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: as for `alloc`.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from one of the calls above.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        // SAFETY: `ptr` came from one of the calls above; `new_size` is non-zero.
        unsafe {
            if plain(new_size, layout.align()) {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Returns the calling thread's freed mimalloc pages to the OS; workers call it once they go
/// quiet after a burst, so RSS falls back after load.
fn collect_freed() {
    // SAFETY: mi_collect takes no pointers and only walks the calling thread's own heap (and
    // abandoned segments); mimalloc is the global allocator, so that heap exists.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    /// Every block comes back aligned as asked, through the plain and the aligned calls,
    /// across mimalloc's size classes and through growth by realloc.
    #[test]
    fn blocks_are_aligned_as_asked() {
        let mut held = Vec::new();
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in (1..=600).chain([1000, 4095, 4096, 8192, 10_000, 70_000, 300_000]) {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                for zeroed in [false, true] {
                    // SAFETY: non-zero size; freed below with the same layout.
                    let p = unsafe {
                        if zeroed {
                            super::GLOBAL.alloc_zeroed(layout)
                        } else {
                            super::GLOBAL.alloc(layout)
                        }
                    };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                    if zeroed {
                        // SAFETY: `p` holds `size` initialized (zeroed) bytes.
                        let bytes = unsafe { std::slice::from_raw_parts(p, size) };
                        assert!(bytes.iter().all(|&b| b == 0));
                    }
                    held.push((p, layout));
                }
            }
        }
        for (p, layout) in held {
            // SAFETY: `p` was allocated with `layout` above; the grown block is freed with its
            // new size.
            unsafe {
                let q = super::GLOBAL.realloc(p, layout, layout.size() * 3);
                assert!(!q.is_null());
                assert_eq!(q as usize % layout.align(), 0);
                let grown = Layout::from_size_align(layout.size() * 3, layout.align()).unwrap();
                super::GLOBAL.dealloc(q, grown);
            }
        }
    }
}
