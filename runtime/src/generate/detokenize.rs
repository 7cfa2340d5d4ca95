//! Incremental decoding: turns generated token ids into text deltas that only
//! ever contain complete characters.
//!
//! A byte-level token may hold part of a multi-byte UTF-8 character; decoding
//! it alone gives U+FFFD. Like text-generation-inference, the decoder keeps
//! two offsets into the ids: text is decoded over a short window
//! `ids[prefix..]`, and the new text (past what `ids[prefix..read]` decoded
//! to) is released only when it does not end with U+FFFD. Decoding over a
//! window that starts a little before the new tokens also keeps tokenizers
//! whose decoders depend on context (leading spaces) right.

use super::tokenizer::TextTokenizer;
use crate::error::Result;

/// Decodes one sequence of generated tokens incrementally.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(new) = now.strip_prefix(before.as_str()) {
                self.prefix = self.read;
                self.read = self.ids.len();
                return Ok(new.to_string());
            }
        }
        Ok(String::new())
    }

    /// The text still held back (an incomplete character at the end of
    /// generation decodes to U+FFFD); the decoder is empty afterwards.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        *self = Self::new();
        Ok(match now.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_string(),
            None => String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::bytelevel::{self, encode_bytes, EOS};

    fn tokenizer() -> (tempfile::TempDir, TextTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        bytelevel::write_tokenizer_files(dir.path(), 64).unwrap();
        let t = TextTokenizer::load(dir.path()).unwrap();
        (dir, t)
    }

    #[test]
    fn multi_byte_characters_come_out_whole() {
        let (_d, t) = tokenizer();
        // "aé€😀b": 1 + 2 + 3 + 4 + 1 bytes, one token per byte.
        let text = "aé€😀b";
        let mut d = StreamDecoder::new();
        let deltas: Vec<String> = encode_bytes(text)
            .into_iter()
            .map(|id| d.push(&t, id).unwrap())
            .collect();
        let want = ["a", "", "é", "", "", "€", "", "", "", "😀", "b"];
        assert_eq!(deltas, want);
        assert_eq!(d.finish(&t).unwrap(), "");
    }

    #[test]
    fn special_tokens_add_nothing_and_a_cut_character_is_flushed() {
        let (_d, t) = tokenizer();
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(&t, b'x' as u32).unwrap(), "x");
        assert_eq!(d.push(&t, EOS).unwrap(), "");
        assert_eq!(d.push(&t, 0xE2).unwrap(), "");
        assert_eq!(d.push(&t, 0x82).unwrap(), "");
        assert_eq!(d.finish(&t).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn an_invalid_byte_does_not_block_later_text() {
        let (_d, t) = tokenizer();
        let mut d = StreamDecoder::new();
        let out: String = [0xFFu32, b'o' as u32, b'k' as u32]
            .iter()
            .map(|&i| d.push(&t, i).unwrap())
            .collect();
        assert_eq!(out, "\u{FFFD}ok");
    }
}
