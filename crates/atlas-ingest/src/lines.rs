//! Splits a byte stream into lines with a hard size limit, and turns read
//! errors (a corrupt gzip stream, a truncated archive) into reportable faults
//! instead of lost data: every byte read is either in a line or in a fault.

use std::io::{BufRead, ErrorKind};

/// One unit the splitter produced.
#[derive(Debug)]
pub enum LineItem {
    Line {
        line: u64,
        bytes: Vec<u8>,
        /// The file's last line, without a terminating newline.
        unterminated: bool,
    },
    /// A line longer than the limit: only a prefix is kept.
    TooLong {
        line: u64,
        prefix: Vec<u8>,
        len: u64,
    },
    /// The stream failed; `partial` holds the bytes of the unfinished line.
    Fault {
        line: u64,
        error: std::io::Error,
        partial: Vec<u8>,
    },
}

pub struct LineSplitter<R> {
    inner: R,
    line: u64,
    max: usize,
    done: bool,
}

impl<R: BufRead> LineSplitter<R> {
    pub fn new(inner: R, max_line_bytes: usize) -> Self {
        LineSplitter {
            inner,
            line: 0,
            max: max_line_bytes,
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for LineSplitter<R> {
    type Item = LineItem;

    fn next(&mut self) -> Option<LineItem> {
        if self.done {
            return None;
        }
        let mut buf = Vec::new();
        let mut len = 0u64;
        let mut overflow = false;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.done = true;
                    self.line += 1;
                    return Some(LineItem::Fault {
                        line: self.line,
                        error,
                        partial: buf,
                    });
                }
            };
            if available.is_empty() {
                self.done = true;
                if len == 0 {
                    return None;
                }
                self.line += 1;
                return Some(if overflow {
                    LineItem::TooLong {
                        line: self.line,
                        prefix: buf,
                        len,
                    }
                } else {
                    LineItem::Line {
                        line: self.line,
                        bytes: buf,
                        unterminated: true,
                    }
                });
            }
            let (chunk, found) = match memchr(available) {
                Some(i) => (&available[..i], true),
                None => (available, false),
            };
            len += chunk.len() as u64;
            if !overflow {
                if buf.len() + chunk.len() > self.max {
                    overflow = true;
                    let keep = crate::classify::PREFIX_BYTES
                        .saturating_sub(buf.len())
                        .min(chunk.len());
                    buf.extend_from_slice(&chunk[..keep]);
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            let consumed = chunk.len() + usize::from(found);
            self.inner.consume(consumed);
            if found {
                self.line += 1;
                return Some(if overflow {
                    LineItem::TooLong {
                        line: self.line,
                        prefix: buf,
                        len,
                    }
                } else {
                    LineItem::Line {
                        line: self.line,
                        bytes: buf,
                        unterminated: false,
                    }
                });
            }
        }
    }
}

fn memchr(b: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{BufReader, Cursor, Read};

    fn lines(data: &[u8], max: usize) -> Vec<String> {
        LineSplitter::new(Cursor::new(data.to_vec()), max)
            .map(|i| match i {
                LineItem::Line {
                    line,
                    bytes,
                    unterminated,
                } => {
                    format!(
                        "{line}:{}{}",
                        String::from_utf8_lossy(&bytes),
                        if unterminated { "$" } else { "" }
                    )
                }
                LineItem::TooLong { line, len, .. } => format!("{line}:long{len}"),
                LineItem::Fault { line, .. } => format!("{line}:fault"),
            })
            .collect()
    }

    #[test]
    fn splits_and_flags() {
        assert_eq!(
            lines(b"a\nbb\n\nccc", 100),
            vec!["1:a", "2:bb", "3:", "4:ccc$"]
        );
        assert_eq!(
            lines(b"a\n0123456789\nb\n", 5),
            vec!["1:a", "2:long10", "3:b"]
        );
        assert!(lines(b"", 5).is_empty());
    }

    struct Failing(Cursor<Vec<u8>>);
    impl Read for Failing {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let k = out.len().min(3);
            let n = self.0.read(&mut out[..k])?;
            if n == 0 {
                Err(std::io::Error::other("boom"))
            } else {
                Ok(n)
            }
        }
    }

    #[test]
    fn faults_keep_the_readable_part() {
        let r = BufReader::with_capacity(4, Failing(Cursor::new(b"ab\ncd".to_vec())));
        let items: Vec<_> = LineSplitter::new(r, 100).collect();
        assert!(matches!(&items[0], LineItem::Line { line: 1, bytes, .. } if bytes == b"ab"));
        assert!(matches!(&items[1], LineItem::Fault { line: 2, partial, .. } if partial == b"cd"));
        assert_eq!(items.len(), 2);
    }

    proptest! {
        /// Splitting loses and invents nothing: lines joined by newlines give the input back.
        #[test]
        fn lines_rejoin_to_the_input(data in proptest::collection::vec(proptest::prop_oneof![Just(b'\n'), Just(b'x'), Just(b'{')], 0..200), cap in 1usize..8) {
            let items: Vec<_> = LineSplitter::new(BufReader::with_capacity(cap, Cursor::new(data.clone())), 1 << 20).collect();
            let mut rebuilt = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let LineItem::Line { line, bytes, unterminated } = item else { return Err(TestCaseError::fail("unexpected item")) };
                prop_assert_eq!(*line as usize, i + 1);
                rebuilt.extend_from_slice(bytes);
                if !unterminated { rebuilt.push(b'\n'); }
            }
            prop_assert_eq!(rebuilt, data);
        }
    }
}
