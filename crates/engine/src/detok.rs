//! Streaming detokenization and stop-string detection.
//!
//! Tokens do not map to whole characters: byte-fallback and byte-level
//! vocabularies split multi-byte UTF-8 characters across tokens, and
//! SentencePiece-style decoders treat a leading space differently at the start
//! of a decode. Text is therefore produced by decoding small windows of ids and
//! emitting only the part that is settled.

/// Whatever turns token ids into text (a tokenizer). An incomplete trailing
/// UTF-8 sequence must decode to U+FFFD, as lossy decoders do.
pub trait TokenDecoder {
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
}

/// Turns a stream of generated ids into a stream of text pieces whose
/// concatenation equals the decode of the whole generation, provided decoding
/// more ids only appends text (true of byte-level and byte-fallback decoders).
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Prompt tail followed by every generated id.
    ids: Vec<u32>,
    prompt_len: usize,
    /// Start of the decode window: context that has already been emitted.
    prefix_offset: usize,
    /// End of the emitted ids; everything after it is pending.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// `prompt_tail` is a few of the last prompt ids, decoded only as context
    /// so the first generated token keeps the spacing it has in a full decode.
    pub fn new(prompt_tail: &[u32]) -> Self {
        Self {
            ids: prompt_tail.to_vec(),
            prompt_len: prompt_tail.len(),
            prefix_offset: 0,
            read_offset: prompt_tail.len(),
        }
    }

    pub fn generated(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }

    /// Adds one generated id and returns the text that became safe to show,
    /// possibly empty while a character is still incomplete.
    pub fn push(&mut self, decoder: &dyn TokenDecoder, id: u32) -> Result<String, String> {
        self.ids.push(id);
        self.advance(decoder, false)
    }

    /// Returns all pending text at the end of generation, including a
    /// replacement character for a character that never completed.
    pub fn flush(&mut self, decoder: &dyn TokenDecoder) -> Result<String, String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        self.advance(decoder, true)
    }

    fn advance(&mut self, decoder: &dyn TokenDecoder, force: bool) -> Result<String, String> {
        let prefix_text = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = decoder.decode(&self.ids[self.prefix_offset..])?;
        let piece = new_suffix(&new_text, &prefix_text);
        if !force && (piece.is_empty() || new_text.ends_with('\u{FFFD}')) {
            return Ok(String::new());
        }
        let piece = piece.to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(piece)
    }
}

/// The part of `full` after `shown`. A decoder that rewrites earlier text
/// once more ids follow (e.g. removing the space before punctuation) breaks
/// the prefix relation; text already shown cannot be taken back, so the
/// stream continues from where the two diverge rather than dropping the new
/// characters, at the cost of differing from a full decode there.
fn new_suffix<'a>(full: &'a str, shown: &str) -> &'a str {
    if let Some(rest) = full.strip_prefix(shown) {
        return rest;
    }
    let diverge = full
        .char_indices()
        .zip(shown.chars())
        .find(|((_, a), b)| a != b)
        .map_or(full.len(), |((i, _), _)| i);
    &full[diverge..]
}

/// Result of feeding one piece of text to a [`StopMatcher`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that can be shown now.
    pub emit: String,
    /// A stop string completed; nothing after it will be emitted.
    pub stopped: bool,
}

/// Finds stop strings in streamed text, holding back any tail that might be
/// the beginning of one so a partial stop string is never shown.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored: they would match before any text.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Feeds the next piece. Once a stop string has matched, further input is
    /// discarded and every outcome reports `stopped`.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        // `held` never contains a whole stop string before this push, so any
        // match involves the new text; the earliest one ends the output.
        let first_match = self.stops.iter().filter_map(|s| self.held.find(s)).min();
        if let Some(at) = first_match {
            self.held.truncate(at);
            self.stopped = true;
            return StopOutcome {
                emit: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let emit = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// Releases held-back text at the end of generation; it can no longer
    /// grow into a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest proper prefix of `stop` that `text` ends
/// with. Only prefixes ending on a character boundary of `stop` are tried, and
/// such a prefix starts with a leading byte, so the cut in `text` is always a
/// character boundary too.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .rev()
        .map(|(i, _)| i)
        .take_while(|&len| len > 0)
        .find(|&len| text.ends_with(&stop[..len]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps ids to raw bytes and decodes lossily, like a byte-level or
    /// byte-fallback tokenizer. With `strip_leading_space`, a decode drops
    /// one leading space, as SentencePiece's decoder does.
    struct FakeDecoder {
        vocab: Vec<Vec<u8>>,
        strip_leading_space: bool,
    }

    impl TokenDecoder for FakeDecoder {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            let mut bytes = Vec::new();
            for &id in ids {
                let token = self
                    .vocab
                    .get(id as usize)
                    .ok_or_else(|| format!("unknown id {id}"))?;
                bytes.extend_from_slice(token);
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            match text.strip_prefix(' ') {
                Some(rest) if self.strip_leading_space => Ok(rest.to_owned()),
                _ => Ok(text),
            }
        }
    }

    const HELLO: u32 = 0;
    const SP_WORLD: u32 = 1;
    const E_ACUTE_1: u32 = 2;
    const E_ACUTE_2: u32 = 3;
    const EMOJI_1: u32 = 4;
    const BANG: u32 = 8;
    const CAF: u32 = 9;
    const SP: u32 = 10;

    fn decoder(strip_leading_space: bool) -> FakeDecoder {
        let emoji = "😀".as_bytes();
        let mut vocab = vec![
            b"Hello".to_vec(),
            b" world".to_vec(),
            vec![0xC3],
            vec![0xA9],
        ];
        vocab.extend(emoji.iter().map(|&b| vec![b]));
        vocab.extend([b"!".to_vec(), b"caf".to_vec(), b" ".to_vec()]);
        FakeDecoder {
            vocab,
            strip_leading_space,
        }
    }

    fn stream(dec: &FakeDecoder, tail: &[u32], ids: &[u32]) -> (Vec<String>, String) {
        let mut inc = IncrementalDecoder::new(tail);
        let pieces: Vec<String> = ids.iter().map(|&id| inc.push(dec, id).unwrap()).collect();
        let flushed = inc.flush(dec).unwrap();
        assert_eq!(inc.generated(), ids);
        (pieces, flushed)
    }

    #[test]
    fn split_characters_are_held_until_complete() {
        let dec = decoder(false);
        let ids = [CAF, E_ACUTE_1, E_ACUTE_2, SP, EMOJI_1, 5, 6, 7, BANG];
        let (pieces, flushed) = stream(&dec, &[], &ids);
        assert_eq!(pieces, ["caf", "", "é", " ", "", "", "", "😀", "!"]);
        assert_eq!(flushed, "");
        assert_eq!(pieces.concat(), dec.decode(&ids).unwrap());
    }

    #[test]
    fn prompt_tail_preserves_leading_space() {
        let dec = decoder(true);
        let (pieces, flushed) = stream(&dec, &[HELLO], &[SP_WORLD, BANG]);
        assert_eq!(pieces, [" world", "!"]);
        assert_eq!(flushed, "");
        // Without context the decoder strips the space, as a full decode of
        // the generated ids alone would.
        let (pieces, _) = stream(&dec, &[], &[SP_WORLD, BANG]);
        assert_eq!(pieces.concat(), dec.decode(&[SP_WORLD, BANG]).unwrap());
        assert_eq!(pieces.concat(), "world!");
    }

    #[test]
    fn flush_releases_incomplete_character_as_replacement() {
        let dec = decoder(false);
        let ids = [HELLO, EMOJI_1, 5];
        let (pieces, flushed) = stream(&dec, &[], &ids);
        assert_eq!(pieces, ["Hello", "", ""]);
        assert_eq!(flushed, "\u{FFFD}");
        assert_eq!(pieces.concat() + &flushed, dec.decode(&ids).unwrap());
    }

    #[test]
    fn random_streams_match_full_decode() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let whole = [vec![HELLO], vec![SP_WORLD], vec![BANG], vec![CAF], vec![SP]];
        let split = [vec![E_ACUTE_1, E_ACUTE_2], vec![EMOJI_1, 5, 6, 7]];
        let mut rng = StdRng::seed_from_u64(11);
        for strip in [false, true] {
            let dec = decoder(strip);
            for _ in 0..200 {
                // Valid text: split characters arrive whole, in order.
                let mut ids = Vec::new();
                for _ in 0..rng.random_range(1..30) {
                    let group = if rng.random_bool(0.4) {
                        &split[rng.random_range(0..split.len())]
                    } else {
                        &whole[rng.random_range(0..whole.len())]
                    };
                    ids.extend_from_slice(group);
                }
                let tail = [HELLO, SP];
                let (pieces, flushed) = stream(&dec, &tail, &ids);
                assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
                assert_eq!(flushed, "");
                let all: Vec<u32> = tail.iter().chain(&ids).copied().collect();
                let full = dec.decode(&all).unwrap();
                let context = dec.decode(&tail).unwrap();
                assert_eq!(pieces.concat(), full[context.len()..]);

                // Arbitrary byte soup: lossy output must still add up.
                let soup: Vec<u32> = (0..rng.random_range(1..30))
                    .map(|_| rng.random_range(0..dec.vocab.len() as u32))
                    .collect();
                let (pieces, flushed) = stream(&dec, &[], &soup);
                assert_eq!(pieces.concat() + &flushed, dec.decode(&soup).unwrap());
            }
        }
    }

    /// Mimics `clean_up_tokenization_spaces`, which rewrites text that an
    /// earlier window already produced.
    struct CleanupDecoder(FakeDecoder);

    impl TokenDecoder for CleanupDecoder {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            Ok(self.0.decode(ids)?.replace(" !", "!"))
        }
    }

    #[test]
    fn rewriting_decoder_loses_no_new_text() {
        let dec = CleanupDecoder(decoder(false));
        let mut inc = IncrementalDecoder::new(&[]);
        let pieces: Vec<String> = [HELLO, SP, BANG, SP_WORLD]
            .iter()
            .map(|&id| inc.push(&dec, id).unwrap())
            .collect();
        assert_eq!(pieces, ["Hello", " ", "!", " world"]);
        assert_eq!(inc.flush(&dec).unwrap(), "");
    }

    #[test]
    fn decoder_errors_propagate() {
        let dec = decoder(false);
        let mut inc = IncrementalDecoder::new(&[]);
        assert!(inc.push(&dec, 999).is_err());
    }

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    fn out(emit: &str, stopped: bool) -> StopOutcome {
        StopOutcome {
            emit: emit.to_owned(),
            stopped,
        }
    }

    #[test]
    fn stop_split_across_pushes() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(m.push("Hello <"), out("Hello ", false));
        assert_eq!(m.push("/"), out("", false));
        assert_eq!(m.push("s>tail"), out("", true));
        assert_eq!(m.push("more"), out("", true));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_inside_one_push_emits_text_before_it() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("abcSTOPdef"), out("abc", true));
    }

    #[test]
    fn diverging_partial_match_is_released_in_full() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("abST"), out("ab", false));
        assert_eq!(m.push("Ox"), out("STOx", false));
        assert_eq!(m.push("S"), out("", false));
        assert_eq!(m.finish(), "S");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = matcher(&["world", "lo w", "zzz"]);
        assert_eq!(m.push("hel"), out("he", false));
        assert_eq!(m.push("lo world"), out("l", true));
        let mut m = matcher(&["world", "lo w"]);
        assert_eq!(m.push("say hello world"), out("say hel", true));
    }

    #[test]
    fn holdback_keeps_longest_candidate_prefix() {
        // "ab" could start "abc"; "b" alone could start "bd".
        let mut m = matcher(&["abc", "bd"]);
        assert_eq!(m.push("xab"), out("x", false));
        assert_eq!(m.push("d"), out("a", true));
    }

    #[test]
    fn multibyte_stops_hold_back_whole_characters() {
        let mut m = matcher(&["日本", "é!"]);
        assert_eq!(m.push("今日"), out("今", false));
        assert_eq!(m.push("は"), out("日は", false));
        assert_eq!(m.push("caf"), out("caf", false));
        assert_eq!(m.push("é"), out("", false));
        assert_eq!(m.push("?"), out("é?", false));
        assert_eq!(m.push("é!"), out("", true));
        // Same leading byte as 'ü' must not be mistaken for a prefix of it.
        let mut m = matcher(&["ü"]);
        assert_eq!(m.push("é"), out("é", false));
    }

    #[test]
    fn no_stops_passes_text_through() {
        let mut m = matcher(&[""]);
        assert_eq!(m.push("anything"), out("anything", false));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn decoder_pieces_through_stop_matcher() {
        let dec = decoder(false);
        let ids = [CAF, E_ACUTE_1, E_ACUTE_2, BANG, HELLO];
        let mut inc = IncrementalDecoder::new(&[]);
        let mut m = matcher(&["é!"]);
        let mut shown = String::new();
        let mut stopped = false;
        for id in ids {
            let o = m.push(&inc.push(&dec, id).unwrap());
            shown.push_str(&o.emit);
            if o.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(shown, "caf");
    }
}
