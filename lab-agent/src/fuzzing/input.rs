//! The byte format the fuzz targets read their inputs in, and its writer
//! for seeds: fixed-size fields and length-prefixed frames read front to
//! back. Every byte string is a valid input: past the end, numbers read as
//! zero and frames as absent.

/// Reads one fuzz input front to back.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// At most `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.rest.len())
    }

    pub fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// A little-endian number of `N` bytes, zero-extended at the end.
    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let got = self.take(N);
        b[..got.len()].copy_from_slice(got);
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }

    /// A frame: a one-byte length, then that many bytes (fewer at the
    /// end); `None` once the input is exhausted.
    pub fn frame(&mut self) -> Option<&'a [u8]> {
        if self.is_empty() {
            return None;
        }
        let n = usize::from(self.byte());
        Some(self.take(n))
    }

    /// A frame with a two-byte (little-endian) length.
    pub fn long_frame(&mut self) -> Option<&'a [u8]> {
        if self.is_empty() {
            return None;
        }
        let n = usize::from(self.u16());
        Some(self.take(n))
    }
}

/// Writes inputs in the format [`Input`] reads (seed corpora).
#[derive(Debug, Default, Clone)]
pub struct InputWriter {
    out: Vec<u8>,
}

impl InputWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn byte(mut self, b: u8) -> Self {
        self.out.push(b);
        self
    }

    pub fn u16(mut self, v: u16) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Raw bytes (a trailing [`Input::rest`]).
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.out.extend_from_slice(b);
        self
    }

    /// A frame; panics above 255 bytes (a seed-writing mistake).
    pub fn frame(mut self, b: &[u8]) -> Self {
        let n = u8::try_from(b.len()).expect("a frame holds at most 255 bytes");
        self.out.push(n);
        self.out.extend_from_slice(b);
        self
    }

    /// A long frame; panics above 65535 bytes.
    pub fn long_frame(mut self, b: &[u8]) -> Self {
        let n = u16::try_from(b.len()).expect("a long frame holds at most 65535 bytes");
        self.out.extend_from_slice(&n.to_le_bytes());
        self.out.extend_from_slice(b);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_writer_wrote_and_zeros_past_the_end() {
        let bytes = InputWriter::new()
            .byte(7)
            .u16(0x0102)
            .u32(0x0304_0506)
            .u64(9)
            .frame(b"abc")
            .long_frame(b"de")
            .bytes(b"rest")
            .finish();
        let mut i = Input::new(&bytes);
        assert_eq!(i.byte(), 7);
        assert_eq!(i.u16(), 0x0102);
        assert_eq!(i.u32(), 0x0304_0506);
        assert_eq!(i.u64(), 9);
        assert_eq!(i.frame(), Some(&b"abc"[..]));
        assert_eq!(i.long_frame(), Some(&b"de"[..]));
        assert_eq!(i.rest(), b"rest");
        assert!(i.is_empty());
        assert_eq!((i.byte(), i.u32(), i.frame()), (0, 0, None));
        // A frame cut short by the end gives what is there.
        let mut i = Input::new(&[5, b'x', b'y']);
        assert_eq!(i.frame(), Some(&b"xy"[..]));
        let mut i = Input::new(&[0x34]);
        assert_eq!(i.u16(), 0x34);
    }
}
