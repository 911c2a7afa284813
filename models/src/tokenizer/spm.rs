//! The SentencePiece-style vocabulary of GGUF files whose
//! `tokenizer.ggml.model` is `llama` (Llama 1/2, Mistral, Gemma): tokens with
//! scores, byte-fallback tokens `<0xXX>`, `▁` for spaces. Encoding follows
//! llama.cpp's reading of such a vocabulary, so ids equal its ids:
//!
//! 1. Special tokens are cut out of the text first, the longest first:
//!    user-defined ones always, control ones only when asked to parse them.
//! 2. Each remaining piece of text gets a leading space when the file says
//!    `add_space_prefix` and the piece opens the text or follows a special
//!    token; spaces become `▁`.
//! 3. The piece is split into UTF-8 characters, and adjacent symbols merge
//!    greedily: always the pair whose joined text is a token with the highest
//!    score (on a tie, the leftmost).
//! 4. A final symbol is a token (two symbols merge only into one), or a
//!    single character the vocabulary lacks, which falls back to one byte
//!    token per byte.

use std::collections::{BinaryHeap, HashMap};

/// GGUF token types.
pub(super) const TYPE_CONTROL: i64 = 3;
pub(super) const TYPE_USER_DEFINED: i64 = 4;
pub(super) const TYPE_UNKNOWN: i64 = 2;
pub(super) const TYPE_BYTE: i64 = 6;

/// The space marker of SentencePiece vocabularies.
const SPACE: &str = "\u{2581}";

/// A SentencePiece-style vocabulary, ready to encode and decode.
#[derive(Debug, Clone)]
pub(super) struct Spm {
    tokens: Vec<String>,
    types: Vec<i64>,
    scores: Vec<f32>,
    ids: HashMap<String, u32>,
    /// Byte-fallback token of each byte.
    bytes: [Option<u32>; 256],
    /// Special tokens (control, user-defined, unknown), longest first.
    specials: Vec<u32>,
    add_space_prefix: bool,
}

/// A merge candidate: two adjacent symbols whose joined text is a token.
#[derive(Debug, PartialEq)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Highest score first; on a tie, the leftmost first.
        self.score.total_cmp(&o.score).then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// One symbol of a piece being merged: a byte range of the text and its
/// live neighbours (`usize::MAX` for none).
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

/// A fragment of the text: raw text, or a special token cut out of it.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl Spm {
    /// From the vocabulary's tokens, types and scores (equal lengths, the
    /// caller checked).
    pub(super) fn new(tokens: Vec<String>, types: Vec<i64>, scores: Vec<f32>, add_space_prefix: bool) -> Self {
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                // No byte token: the byte as a one-character token, if any.
                std::str::from_utf8(&[b as u8]).ok().and_then(|s| ids.get(s).copied())
            });
        }
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| matches!(types[i as usize], TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN))
            .filter(|&i| !tokens[i as usize].is_empty())
            .collect();
        specials.sort_by(|&a, &b| tokens[b as usize].len().cmp(&tokens[a as usize].len()).then(a.cmp(&b)));
        Spm { tokens, types, scores, ids, bytes, specials, add_space_prefix }
    }

    /// Whether some byte has no token to fall back to (encoding drops it).
    pub(super) fn drops_byte(&self, b: u8) -> bool {
        self.bytes[usize::from(b)].is_none()
    }

    /// The ids of `text` (no BOS); control tokens spelled in it become
    /// their ids only when `parse_special`.
    pub(super) fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut prev_special = true;
        for f in self.partition(text, parse_special) {
            match f {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    self.encode_piece(&s.replace(' ', SPACE), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Cuts special tokens out of `text`: each in turn, longest first,
    /// every occurrence in what is still raw text, left to right.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.specials {
            let ty = self.types[id as usize];
            if !parse_special && (ty == TYPE_CONTROL || ty == TYPE_UNKNOWN) {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            if !frags.iter().any(|f| matches!(f, Fragment::Text(t) if t.contains(needle))) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(mut t) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = t.find(needle) {
                    if at > 0 {
                        next.push(Fragment::Text(&t[..at]));
                    }
                    next.push(Fragment::Token(id));
                    t = &t[at + needle.len()..];
                }
                if !t.is_empty() {
                    next.push(Fragment::Text(t));
                }
            }
            frags = next;
        }
        frags
    }

    /// Merges one piece of escaped text into tokens.
    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, ch) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol { start, len: ch.len_utf8(), prev: if i == 0 { NONE } else { i - 1 }, next: i + 1 });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        let mut queue = BinaryHeap::new();
        let bigram = |left: usize, right: usize, symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r) = (symbols[left], symbols[right]);
            let joined = &text[l.start..l.start + l.len + r.len];
            if let Some(&id) = self.ids.get(joined) {
                queue.push(Bigram { left, right, score: self.scores[id as usize], size: joined.len() });
            }
        };
        for i in 1..symbols.len() {
            bigram(i - 1, i, &symbols, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            // Stale: one side merged away since, or grew.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if r.next != NONE {
                symbols[r.next].prev = b.left;
            }
            bigram(symbols[b.left].prev, b.left, &symbols, &mut queue);
            bigram(b.left, symbols[b.left].next, &symbols, &mut queue);
        }
        // Every merged symbol is a token (a pair merges only into one); a
        // character that is none falls back to its bytes.
        let mut i = 0;
        while i != NONE {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.bytes[usize::from(b)])),
            }
            i = s.next;
        }
    }

    /// The bytes `id` stands for in decoded text (control tokens: nothing
    /// when `skip_special`).
    pub(super) fn piece(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) {
        let Some(t) = self.tokens.get(id as usize) else { return };
        match self.types[id as usize] {
            TYPE_BYTE => {
                if let Some(b) = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(b);
                }
            }
            TYPE_CONTROL | TYPE_UNKNOWN if skip_special => {}
            TYPE_CONTROL | TYPE_UNKNOWN | TYPE_USER_DEFINED => out.extend_from_slice(t.as_bytes()),
            _ => out.extend_from_slice(t.replace(SPACE, " ").as_bytes()),
        }
    }
}
