//! A source longer than its image. The pager serves a region only from a source at least as
//! long as it, and two tools fill more memory than their image holds: `restore`'s image may
//! end in a partial page (the region is whole pages), and `bench`'s image is a pattern of at
//! most 64 MiB repeated over regions of many GiB. [`Stretched`] does that job for both: it
//! reports the region's length and answers each fetch from its content — another source read
//! as it is (past its end, zeros, as every source's bytes past its end read), or a pattern
//! repeated.

use std::ops::Range;
use std::sync::Arc;

use pager::{ChildSource, Fetched, Placer, Source, SourceError};

/// A source of `len` bytes over shorter content (see the module docs).
pub struct Stretched {
    content: Content,
    len: u64,
}

/// What a [`Stretched`] source serves.
enum Content {
    /// Another source, read as it is: past its end, zeros.
    Padded(Arc<dyn Source>),
    /// A pattern of whole pages, repeated: page `i` holds the pattern's page `i mod` its
    /// length. Answered from the pattern itself (no copy) unless a run wraps round its end.
    Repeated(Arc<Vec<u8>>),
}

impl Stretched {
    /// `inner` served as `len` bytes: an image ending in a partial page served as whole
    /// pages, zero-padded.
    pub fn padded(inner: Arc<dyn Source>, len: u64) -> Stretched {
        Stretched {
            content: Content::Padded(inner),
            len,
        }
    }

    /// `pattern` repeated over `len` bytes: a sweep to 8 GiB needs no 8 GiB image.
    pub fn repeated(pattern: Arc<Vec<u8>>, len: u64) -> Stretched {
        Stretched {
            content: Content::Repeated(pattern),
            len,
        }
    }
}

impl Source for Stretched {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let pattern = match &self.content {
            Content::Padded(inner) => return inner.fetch(offset, scratch),
            Content::Repeated(pattern) => pattern,
        };
        let period = pattern.len();
        let at = (offset % period as u64) as usize;
        let want = scratch.len();
        if at + want <= period {
            return Ok(Fetched::Data(&pattern[at..at + want]));
        }
        let (mut filled, mut from) = (0, at);
        while filled < want {
            let n = (period - from).min(want - filled);
            scratch[filled..filled + n].copy_from_slice(&pattern[from..from + n]);
            filled += n;
            from = 0;
        }
        Ok(Fetched::Data(scratch))
    }

    fn zero_ranges(&self) -> Vec<Range<u64>> {
        match &self.content {
            Content::Padded(inner) => inner.zero_ranges(),
            Content::Repeated(_) => Vec::new(),
        }
    }

    fn attach(&self, placer: Placer) {
        if let Content::Padded(inner) = &self.content {
            inner.attach(placer)
        }
    }

    fn prioritize(&self, offset: u64) {
        if let Content::Padded(inner) = &self.content {
            inner.prioritize(offset)
        }
    }

    fn child(&self) -> ChildSource {
        match &self.content {
            Content::Padded(inner) => match inner.child() {
                ChildSource::Own(inner) => {
                    ChildSource::Own(Arc::new(Stretched::padded(inner, self.len)))
                }
                other => other,
            },
            Content::Repeated(_) => ChildSource::Shared,
        }
    }

    fn signal_safe(&self) -> Option<pager::SignalSafe> {
        match &self.content {
            Content::Padded(inner) => inner.signal_safe(),
            // SAFETY: a repeated image is copied out of memory it owns.
            Content::Repeated(_) => Some(unsafe { pager::SignalSafe::promise() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_pattern_wraps_round_its_end() {
        let pattern: Vec<u8> = (0..16u8).collect();
        let src = Stretched::repeated(Arc::new(pattern), 64);
        let mut scratch = [0u8; 8];
        let Fetched::Data(d) = src.fetch(12, &mut scratch).unwrap() else {
            panic!("data")
        };
        assert_eq!(d, &[12, 13, 14, 15, 0, 1, 2, 3]);
        let mut scratch = [0u8; 4];
        let Fetched::Data(d) = src.fetch(36, &mut scratch).unwrap() else {
            panic!("data")
        };
        assert_eq!(d, &[4, 5, 6, 7]);
        let mut long = [0u8; 40];
        let Fetched::Data(d) = src.fetch(10, &mut long).unwrap() else {
            panic!("data")
        };
        let want: Vec<u8> = (10..50).map(|i| (i % 16) as u8).collect();
        assert_eq!(d, want.as_slice());
    }

    #[test]
    fn a_padded_source_reports_the_longer_length_and_reads_zeros_past_the_image() {
        let image: Vec<u8> = (0..6000).map(|i| (i % 251) as u8 + 1).collect();
        let inner: Arc<dyn Source> = Arc::new(pager::MemorySource::new(image.clone()));
        let src = Stretched::padded(inner, 8192);
        assert_eq!(src.len(), 8192);
        let mut page = vec![0xAAu8; 4096];
        let Fetched::Data(d) = src.fetch(4096, &mut page).unwrap() else {
            panic!("data")
        };
        assert_eq!(&d[..6000 - 4096], &image[4096..]);
        assert!(d[6000 - 4096..].iter().all(|&b| b == 0));
    }
}
