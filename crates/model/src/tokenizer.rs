//! The tokenizer: a `tokenizers::Tokenizer`, loaded from a tokenizer.json or rebuilt from a GGUF
//! file's `tokenizer.ggml.*` metadata, plus what generation needs to know around it (BOS, the
//! tokens that end generation, which tokens are special).

use crate::gguf::GgufFile;
use crate::{ModelError, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::LazyLock;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior};

/// Special tokens that end a turn or a document in common chat models. When the vocabulary has
/// them as special tokens they stop generation along with the declared EOS, since instruction
/// models often declare one but emit the other.
const END_TOKENS: [&str; 8] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// The Llama-3 split: contractions, letter runs with one leading non-letter, digit groups of up
/// to three, punctuation runs, newlines, other whitespace.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split: as Llama-3's but every digit stands alone.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Values of `tokenizer.ggml.pre` we can rebuild, for error messages.
const SUPPORTED_PRE: &str =
    "smollm, llama-bpe (llama3, llama-v3), qwen2 (deepseek-r1-qwen), gpt-2, default";

/// `tokenizer.ggml.token_type` values.
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    add_bos: bool,
    /// The declared EOS first, then other end-of-turn tokens.
    eos_ids: Vec<u32>,
    special: BTreeMap<u32, String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("add_bos", &self.add_bos)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads a Hugging Face tokenizer.json. BOS comes from its post-processor: if encoding empty
    /// text with special tokens yields a leading special token, that is BOS and it is added.
    /// The post-processor is then dropped so that `add_bos` alone decides, and the
    /// tokenizer_config.json values applied by [`Tokenizer::configure`] can override it.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            let message = e.to_string();
            match e.downcast::<std::io::Error>() {
                Ok(io) => ModelError::io(path, *io),
                Err(_) => ModelError::format(path, message),
            }
        })?;
        let special: BTreeMap<u32, String> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        let probe = inner
            .encode_fast("", true)
            .map_err(|e| ModelError::format(path, e.to_string()))?;
        let bos_id = probe
            .get_ids()
            .first()
            .copied()
            .filter(|id| special.contains_key(id));
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let mut tokenizer = Tokenizer {
            inner,
            bos_id,
            add_bos: bos_id.is_some(),
            eos_ids: Vec::new(),
            special,
        };
        tokenizer.eos_ids = tokenizer.named_end_tokens();
        Ok(tokenizer)
    }

    /// Rebuilds the tokenizer a GGUF file describes, as llama.cpp and transformers read it.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let types = match gguf.get("tokenizer.ggml.token_type") {
            Some(_) => gguf.get_i32_array("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(ModelError::format(
                gguf.path(),
                format!(
                    "field `tokenizer.ggml.token_type`: {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                ),
            ));
        }
        let token_id = |key: &str| -> Result<Option<u32>> {
            match gguf.get(key) {
                None => Ok(None),
                Some(_) => {
                    let id = gguf.get_u64(key)?;
                    if id >= tokens.len() as u64 {
                        return Err(ModelError::format(
                            gguf.path(),
                            format!(
                                "field `{key}`: id {id} is outside the {}-token vocabulary",
                                tokens.len()
                            ),
                        ));
                    }
                    Ok(Some(id as u32))
                }
            }
        };
        let bos_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = token_id("tokenizer.ggml.eos_token_id")?;
        let unk_id = token_id("tokenizer.ggml.unknown_token_id")?;
        let pad_id = token_id("tokenizer.ggml.padding_token_id")?;
        let extra_end_ids = [
            token_id("tokenizer.ggml.eot_token_id")?,
            token_id("tokenizer.ggml.eom_token_id")?,
        ];
        let pre = gguf.opt_str("tokenizer.ggml.pre").unwrap_or("default");

        let (inner, default_add_bos) = match model {
            "gpt2" => (byte_level_bpe(gguf, &tokens, pre)?, pre == "llama-bpe"),
            "llama" => (sentencepiece_bpe(gguf, &tokens, &types, unk_id)?, true),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "{}: unsupported tokenizer model `{other}` in `tokenizer.ggml.model` (supported: gpt2, llama)",
                    gguf.path().display()
                )))
            }
        };
        let add_bos = match gguf.get("tokenizer.ggml.add_bos_token") {
            Some(_) => gguf.get_bool("tokenizer.ggml.add_bos_token")?,
            None => default_add_bos,
        };

        let mut tokenizer = Tokenizer {
            inner,
            bos_id,
            add_bos: add_bos && bos_id.is_some(),
            eos_ids: Vec::new(),
            special: BTreeMap::new(),
        };
        tokenizer.add_gguf_added_tokens(model, &tokens, &types, [bos_id, eos_id, unk_id, pad_id]);
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        eos_ids.extend(extra_end_ids.into_iter().flatten());
        eos_ids.extend(tokenizer.named_end_tokens());
        tokenizer.eos_ids = dedup_in_order(eos_ids);
        Ok(tokenizer)
    }

    /// Registers control and unknown tokens (and the declared BOS/EOS/UNK/PAD) as special added
    /// tokens, and user-defined ones as plain added tokens, so that their text in a prompt maps to
    /// their id instead of being split.
    fn add_gguf_added_tokens(
        &mut self,
        model: &str,
        tokens: &[&str],
        types: &[i32],
        declared: [Option<u32>; 4],
    ) {
        let byte_level = model == "gpt2";
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (id, (&token, &ty)) in tokens.iter().zip(types).enumerate() {
            let id = id as u32;
            // In a byte-level vocabulary a real token is spelled in the byte alphabet; a
            // "control" token that is not is a conversion mislabel, and registering it would
            // give its text a second id.
            if byte_level && !in_byte_alphabet(token) {
                continue;
            }
            if ty == TOKEN_CONTROL || ty == TOKEN_UNKNOWN || declared.contains(&Some(id)) {
                special.push(AddedToken::from(token, true).normalized(false));
                self.special.insert(id, token.to_string());
            } else if ty == TOKEN_USER_DEFINED {
                user.push(AddedToken::from(token, false).normalized(false));
            }
        }
        self.inner.add_special_tokens(&special);
        self.inner.add_tokens(&user);
    }

    /// Special tokens with one of the usual end-of-turn names, in id order.
    fn named_end_tokens(&self) -> Vec<u32> {
        self.special
            .iter()
            .filter(|(_, text)| END_TOKENS.contains(&text.as_str()))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Token ids for `text`. With `add_special_tokens`, BOS is prepended when the model wants
    /// it, unless the text already starts with it. Special-token text is always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, true, Some(bos)) = (add_special_tokens, self.add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// Including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token's vocabulary entry (byte-level tokens are in their byte-alphabet spelling).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Tokens that end generation, the declared EOS first.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains_key(&id)
    }

    /// The text of a special token.
    pub fn special_token(&self, id: u32) -> Option<&str> {
        self.special.get(&id).map(String::as_str)
    }

    /// The underlying `tokenizers` tokenizer, for streaming decoders and the like. It adds no
    /// BOS of its own.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Makes `token` the BOS token.
    pub fn set_bos_token(&mut self, token: &str) -> Result<()> {
        self.bos_id = Some(self.known_id(token, "bos")?);
        Ok(())
    }

    /// Makes `token` the declared EOS, keeping the other end-of-turn tokens.
    pub fn set_eos_token(&mut self, token: &str) -> Result<()> {
        let id = self.known_id(token, "eos")?;
        self.eos_ids.retain(|&e| e != id);
        self.eos_ids.insert(0, id);
        Ok(())
    }

    /// Whether `encode(.., true)` prepends BOS; has no effect while there is no BOS token.
    pub fn set_add_bos(&mut self, add_bos: bool) {
        self.add_bos = add_bos;
    }

    /// Applies tokenizer_config.json values. A token string the vocabulary lacks is ignored:
    /// such configs exist (a BOS named but never used) and the tokenizer still works without it.
    pub fn configure(&mut self, bos: Option<&str>, eos: Option<&str>, add_bos: Option<bool>) {
        if let Some(bos) = bos {
            let _ = self.set_bos_token(bos);
        }
        if let Some(eos) = eos {
            let _ = self.set_eos_token(eos);
        }
        if let Some(add_bos) = add_bos {
            self.set_add_bos(add_bos);
        }
        self.add_bos &= self.bos_id.is_some();
    }

    fn known_id(&self, token: &str, role: &str) -> Result<u32> {
        self.token_to_id(token).ok_or_else(|| {
            ModelError::Tokenizer(format!("{role} token `{token}` is not in the vocabulary"))
        })
    }
}

fn dedup_in_order(ids: Vec<u32>) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
/// (controls, space, DEL, NBSP, soft hyphen) are moved to U+0100 onwards in byte order, so every
/// byte has a visible character.
static BYTE_CHARS: LazyLock<[char; 256]> = LazyLock::new(|| {
    let mut chars = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        chars[b as usize] = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            b as char
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("below U+0144")
        };
    }
    chars
});

static ALPHABET: LazyLock<HashSet<char>> = LazyLock::new(|| BYTE_CHARS.iter().copied().collect());

fn in_byte_alphabet(token: &str) -> bool {
    token.chars().all(|c| ALPHABET.contains(&c))
}

fn byte_level_bpe(gguf: &GgufFile, tokens: &[&str], pre: &str) -> Result<tokenizers::Tokenizer> {
    let regex_split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match pre {
        "smollm" => (
            PreSequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
            false,
        ),
        // Llama-3's own tokenizer.json (and llama.cpp) look a whole pre-token up before merging.
        "llama-bpe" | "llama3" | "llama-v3" => (regex_split(LLAMA3_SPLIT)?, true),
        "qwen2" | "deepseek-r1-qwen" => (regex_split(QWEN2_SPLIT)?, false),
        "gpt-2" | "default" => (ByteLevel::new(false, true, true).into(), false),
        other => {
            return Err(ModelError::Tokenizer(format!(
                "{}: unsupported pre-tokenizer `{other}` in `tokenizer.ggml.pre` (supported: {SUPPORTED_PRE})",
                gguf.path().display()
            )))
        }
    };
    // Some converters store tokens with characters outside the byte alphabet as plain UTF-8;
    // the model only ever sees byte-alphabet spellings, so respell those.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| {
            let spelled = if in_byte_alphabet(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| BYTE_CHARS[b as usize]).collect()
            };
            (spelled, id as u32)
        })
        .collect();
    let merges = gguf_merges(gguf)?.ok_or_else(|| {
        ModelError::format(
            gguf.path(),
            "field `tokenizer.ggml.merges`: missing (needed by a gpt2 tokenizer)",
        )
    })?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| ModelError::format(gguf.path(), format!("tokenizer vocabulary: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevel::new(false, true, true)));
    Ok(inner)
}

fn gguf_merges(gguf: &GgufFile) -> Result<Option<Vec<(String, String)>>> {
    if gguf.get("tokenizer.ggml.merges").is_none() {
        return Ok(None);
    }
    gguf.get_str_array("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
            _ => Err(ModelError::format(
                gguf.path(),
                format!("field `tokenizer.ggml.merges`: entry #{i} `{m}` is not two tokens"),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// SentencePiece as Hugging Face converts it: BPE with byte fallback, merges ranked by the score
/// of the token they produce (the file's merges if it has them), a normalizer that turns spaces
/// into `▁` and (per `tokenizer.ggml.add_space_prefix`, default on) prepends one to each piece of
/// text, and the inverse decoder.
fn sentencepiece_bpe(
    gguf: &GgufFile,
    tokens: &[&str],
    types: &[i32],
    unk_id: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| (t.to_string(), id as u32))
        .collect();
    let merges = match gguf_merges(gguf)? {
        Some(merges) => merges,
        None => {
            let scores = gguf.get_f32_array("tokenizer.ggml.scores")?;
            if scores.len() != tokens.len() {
                return Err(ModelError::format(
                    gguf.path(),
                    format!(
                        "field `tokenizer.ggml.scores`: {} entries for {} tokens",
                        scores.len(),
                        tokens.len()
                    ),
                ));
            }
            merges_from_scores(tokens, &scores, &vocab)
        }
    };
    let unk = unk_id.or_else(|| {
        types
            .iter()
            .position(|&t| t == TOKEN_UNKNOWN)
            .map(|i| i as u32)
    });
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk as usize].to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| ModelError::format(gguf.path(), format!("tokenizer vocabulary: {e}")))?;

    let add_space_prefix = match gguf.get("tokenizer.ggml.add_space_prefix") {
        Some(_) => gguf.get_bool("tokenizer.ggml.add_space_prefix")?,
        None => true,
    };
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(tok_err);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)));
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// Merges implied by a scored vocabulary: every split of a token into two vocabulary tokens is a
/// merge, ranked by the token's score (higher first), then by longer left and right parts, then
/// by vocabulary order. SentencePiece's BPE encoder repeatedly joins the adjacent pair whose
/// result scores best, which is what this ranking reproduces.
fn merges_from_scores(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    struct Candidate<'a> {
        score: f32,
        left_chars: usize,
        right_chars: usize,
        order: (usize, u32, u32),
        left: &'a str,
        right: &'a str,
    }
    let mut candidates = Vec::new();
    for (index, (&token, &score)) in tokens.iter().zip(scores).enumerate() {
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                candidates.push(Candidate {
                    score,
                    left_chars: left.chars().count(),
                    right_chars: right.chars().count(),
                    order: (index, l, r),
                    left,
                    right,
                });
            }
        }
    }
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
            .then(a.order.cmp(&b.order))
    });
    candidates
        .into_iter()
        .map(|c| (c.left.to_string(), c.right.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tests::Writer;
    use crate::gguf::MetaValue;

    fn strings(items: &[String]) -> MetaValue {
        MetaValue::Array(items.iter().map(|s| MetaValue::String(s.clone())).collect())
    }

    fn ints(items: &[i32]) -> MetaValue {
        MetaValue::Array(items.iter().map(|&v| MetaValue::I32(v)).collect())
    }

    fn open(w: Writer) -> Result<Tokenizer> {
        Tokenizer::from_gguf(&w.open("tokenizer").unwrap())
    }

    /// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, normal pieces
    /// scored by position (single characters last), and a user-defined `<|user|>`.
    fn sentencepiece(add_space_prefix: Option<bool>) -> Writer {
        let normal = [
            "▁",
            "h",
            "e",
            "l",
            "o",
            "w",
            "r",
            "d",
            "i",
            "t",
            "s",
            "a",
            "n",
            "he",
            "ll",
            "lo",
            "▁h",
            "▁he",
            "hel",
            "hell",
            "llo",
            "hello",
            "▁hello",
            "▁w",
            "or",
            "wor",
            "▁wor",
            "ld",
            "rld",
            "orld",
            "▁world",
            "▁▁",
            "▁▁▁",
            "in",
            "it",
            "▁i",
            "▁in",
            "▁is",
            "is",
            "▁t",
            "th",
            "▁th",
            "at",
            "▁that",
            "an",
            "▁an",
            "a▁",
            "tt",
        ];
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
        tokens.extend(normal.iter().map(|t| t.to_string()));
        tokens.push("<|user|>".into());
        let mut types = vec![2, 3, 3];
        types.extend([6; 256]);
        types.extend([1; 48]);
        types.push(4);
        let mut scores = vec![MetaValue::F32(0.0); 259];
        scores.extend(normal.iter().enumerate().map(|(i, t)| {
            MetaValue::F32(if t.chars().count() > 1 {
                -(i as f32)
            } else {
                -1000.0 - i as f32
            })
        }));
        scores.push(MetaValue::F32(0.0));
        let mut w = Writer::new()
            .kv("tokenizer.ggml.model", MetaValue::String("llama".into()))
            .kv("tokenizer.ggml.tokens", strings(&tokens))
            .kv("tokenizer.ggml.token_type", ints(&types))
            .kv("tokenizer.ggml.scores", MetaValue::Array(scores))
            .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
            .kv("tokenizer.ggml.unknown_token_id", MetaValue::U32(0));
        if let Some(prefix) = add_space_prefix {
            w = w.kv("tokenizer.ggml.add_space_prefix", MetaValue::Bool(prefix));
        }
        w
    }

    /// Expected ids are transformers' for the same vocabulary written as a GGUF by the Python
    /// `gguf` package.
    #[test]
    fn sentencepiece_matches_transformers() {
        let t = open(sentencepiece(None)).unwrap();
        assert_eq!(
            (t.bos_id(), t.add_bos(), t.eos_ids()),
            (Some(1), true, &[2][..])
        );
        let cases: [(&str, &[u32], &str); 9] = [
            ("hello world", &[1, 281, 289], "hello world"),
            ("hello  world", &[1, 281, 259, 289], "hello  world"),
            // transformers' Metaspace skips the prefix when the text already starts with a space
            // ([1, 259, 281], decoding to " hello"); llama.cpp and Llama's own tokenizer.json
            // always prepend one, which round-trips.
            ("  hello", &[1, 290, 281], "  hello"),
            (
                "hello world is that",
                &[1, 281, 289, 296, 302],
                "hello world is that",
            ),
            // é is not a piece: its UTF-8 bytes fall back to byte tokens.
            ("héllo", &[1, 275, 198, 172, 279], "héllo"),
            ("a tt", &[1, 259, 270, 298, 268], "a tt"),
            ("x", &[1, 259, 123], "x"),
            ("in it is an", &[1, 295, 259, 293, 296, 304], "in it is an"),
            ("", &[1], ""),
        ];
        for (text, ids, skipped) in cases {
            assert_eq!(t.encode(text, true).unwrap(), ids, "{text:?}");
            assert_eq!(t.encode(text, false).unwrap(), ids[1..], "{text:?}");
            assert_eq!(t.decode(ids, true).unwrap(), skipped, "{text:?}");
        }
        assert_eq!(t.decode(&[1, 281, 289], false).unwrap(), "<s> hello world");
        assert_eq!(t.encode("<s>hello", true).unwrap(), [1, 281]);
        // transformers' Metaspace gives `hello` (280) after the added token; llama.cpp, and
        // the Prepend normalizer of Llama's own tokenizer.json, give `▁hello`.
        assert_eq!(
            t.encode("world<|user|>hello", true).unwrap(),
            [1, 289, 307, 281]
        );
        assert!(!t.is_special(307) && t.is_special(0) && t.is_special(2));
    }

    #[test]
    fn sentencepiece_without_space_prefix() {
        let t = open(sentencepiece(Some(false))).unwrap();
        assert_eq!(t.encode("hello world", false).unwrap(), [280, 289]);
        assert_eq!(t.decode(&[280, 289], false).unwrap(), "hello world");
    }

    /// A byte-level vocabulary: three control tokens, the 256 byte characters, a few merged
    /// tokens and a user-defined `<think>`.
    fn byte_level(pre: &str) -> Writer {
        let merges = [
            "Ġ t", "h e", "Ġt he", "1 2", "12 3", "Ġ 1", "Ġ w", "o r", "Ġw or", "Ġ Ġ", "' s",
        ];
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .map(String::from)
            .to_vec();
        tokens.extend(BYTE_CHARS.iter().map(|c| c.to_string()));
        tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
        tokens.push("<think>".into());
        let mut types = vec![3; 3];
        types.extend([1; 256 + 11]);
        types.push(4);
        Writer::new()
            .kv("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", MetaValue::String(pre.into()))
            .kv("tokenizer.ggml.tokens", strings(&tokens))
            .kv("tokenizer.ggml.token_type", ints(&types))
            .kv("tokenizer.ggml.merges", strings(&merges.map(String::from)))
            .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
            .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
    }

    /// Expected ids: transformers loading the same vocabulary from a GGUF for gpt-2, llama-bpe
    /// and qwen2; for smollm, a `tokenizers` pipeline of Digits + ByteLevel as in SmolLM2's
    /// tokenizer.json.
    #[test]
    fn byte_level_pre_tokenizers_match_the_reference() {
        let texts = [
            "the 123 wor",
            "Ġthe  12345",
            "<|im_start|>the<|im_end|>",
            "it's 7 <think>x",
            "  the\n\n 1",
        ];
        let expected: [(&str, [&[u32]; 5]); 4] = [
            (
                "gpt-2",
                [
                    &[119, 260, 35, 263, 267],
                    &[199, 163, 119, 260, 35, 35, 263, 55, 56],
                    &[1, 119, 260, 2],
                    &[108, 119, 269, 35, 58, 35, 270, 123],
                    &[35, 261, 13, 13, 264],
                ],
            ),
            (
                "llama-bpe",
                [
                    &[119, 260, 35, 263, 267],
                    &[199, 163, 119, 260, 35, 35, 263, 55, 56],
                    &[1, 119, 260, 2],
                    &[108, 119, 269, 35, 58, 35, 270, 123],
                    &[35, 261, 13, 13, 35, 52],
                ],
            ),
            (
                "qwen2",
                [
                    &[119, 260, 35, 52, 53, 54, 267],
                    &[199, 163, 119, 260, 35, 35, 52, 53, 54, 55, 56],
                    &[1, 119, 260, 2],
                    &[108, 119, 269, 35, 58, 35, 270, 123],
                    &[35, 261, 13, 13, 35, 52],
                ],
            ),
            (
                "smollm",
                [
                    &[119, 260, 35, 52, 53, 54, 267],
                    &[199, 163, 119, 260, 268, 52, 53, 54, 55, 56],
                    &[1, 119, 260, 2],
                    &[108, 119, 269, 35, 58, 35, 270, 123],
                    &[35, 261, 13, 13, 35, 52],
                ],
            ),
        ];
        for (pre, ids) in expected {
            let t = open(byte_level(pre)).unwrap();
            assert_eq!(t.vocab_size(), 271);
            assert_eq!((t.bos_id(), t.add_bos()), (Some(1), false), "{pre}");
            assert_eq!(t.eos_ids(), [2, 0], "{pre}");
            for (text, ids) in texts.iter().zip(ids) {
                assert_eq!(t.encode(text, true).unwrap(), ids, "{pre} {text:?}");
                assert_eq!(t.decode(ids, false).unwrap(), *text, "{pre} {text:?}");
            }
            assert_eq!(t.decode(&[1, 119, 260, 2], true).unwrap(), "the");
            assert_eq!(t.decode(&[270], true).unwrap(), "<think>");
        }
    }

    #[test]
    fn bos_is_added_once_when_wanted() {
        let mut w = byte_level("gpt-2");
        w.kvs.retain(|(k, _)| k != "tokenizer.ggml.add_bos_token");
        let t = open(w.kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(true))).unwrap();
        assert_eq!(t.encode("the", true).unwrap(), [1, 119, 260]);
        assert_eq!(t.encode("<|im_start|>the", true).unwrap(), [1, 119, 260]);
        assert_eq!(t.encode("the", false).unwrap(), [119, 260]);
        let mut w = byte_level("llama-bpe");
        w.kvs.retain(|(k, _)| k != "tokenizer.ggml.add_bos_token");
        assert!(open(w).unwrap().add_bos(), "llama-bpe defaults to BOS");
    }

    #[test]
    fn unsupported_tokenizers_are_named() {
        let err = open(byte_level("mystery")).unwrap_err().to_string();
        assert!(
            err.contains("unsupported pre-tokenizer `mystery`")
                && err.contains("smollm, llama-bpe"),
            "{err}"
        );
        let mut w = byte_level("gpt-2");
        w.kvs[0].1 = MetaValue::String("bert".into());
        let err = open(w).unwrap_err().to_string();
        assert!(err.contains("unsupported tokenizer model `bert`"), "{err}");
        let mut w = byte_level("gpt-2");
        w.kvs.retain(|(k, _)| k != "tokenizer.ggml.merges");
        let err = open(w).unwrap_err().to_string();
        assert!(err.contains("`tokenizer.ggml.merges`: missing"), "{err}");
        let mut w = byte_level("gpt-2");
        w.kvs.retain(|(k, _)| k != "tokenizer.ggml.eos_token_id");
        let err = open(w.kv("tokenizer.ggml.eos_token_id", MetaValue::U32(9999)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("id 9999 is outside the 271-token vocabulary"),
            "{err}"
        );
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        assert_eq!(BYTE_CHARS[b'a' as usize], 'a');
        assert_eq!(BYTE_CHARS[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_CHARS[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_CHARS[0], 'Ā');
        assert_eq!(BYTE_CHARS[0xAD], 'Ń');
        assert_eq!(ALPHABET.len(), 256);
    }
}
