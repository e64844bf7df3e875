//! Key encoding: order-preserving components after the table prefix.
//!
//! - strings are written as their UTF-8 bytes followed by a NUL (names never
//!   contain NUL; the API refuses them);
//! - `u64` as 8 big-endian bytes;
//! - UUIDs as their 16 raw bytes.

/// Builds a key from components.
#[derive(Debug, Default, Clone)]
pub struct Key(Vec<u8>);

impl Key {
    /// An empty key.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a NUL-terminated string.
    pub fn str(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    /// Appends a big-endian `u64`.
    pub fn u64(mut self, n: u64) -> Self {
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }
    /// Appends 16 raw UUID bytes.
    pub fn uuid(mut self, id: &uuid::Uuid) -> Self {
        self.0.extend_from_slice(id.as_bytes());
        self
    }
    /// The encoded key.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads components back from a key.
#[derive(Debug)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Starts reading `key`.
    pub fn new(key: &'a [u8]) -> Self {
        Self(key)
    }
    /// Reads a NUL-terminated string.
    pub fn str(&mut self) -> Option<&'a str> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let s = std::str::from_utf8(&self.0[..end]).ok()?;
        self.0 = &self.0[end + 1..];
        Some(s)
    }
    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*head))
    }
    /// Reads a UUID.
    pub fn uuid(&mut self) -> Option<uuid::Uuid> {
        let (head, rest) = self.0.split_first_chunk::<16>()?;
        self.0 = rest;
        Some(uuid::Uuid::from_bytes(*head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_round_trip() {
        let id = uuid::Uuid::new_v4();
        let k = Key::new().str("peer").u64(42).uuid(&id).str("").finish();
        let mut r = Reader::new(&k);
        assert_eq!(r.str(), Some("peer"));
        assert_eq!(r.u64(), Some(42));
        assert_eq!(r.uuid(), Some(id));
        assert_eq!(r.str(), Some(""));
        assert_eq!(r.u64(), None);
    }

    #[test]
    fn integer_order_is_byte_order() {
        let mut prev = Key::new().str("a").u64(0).finish();
        for n in [1u64, 255, 256, 65_536, u64::MAX] {
            let k = Key::new().str("a").u64(n).finish();
            assert!(k > prev, "{n}");
            prev = k;
        }
        // A string is never a prefix-collision of a longer one.
        assert!(Key::new().str("a").u64(u64::MAX).finish() < Key::new().str("ab").u64(0).finish());
    }
}
