// Encoding speed of comigs against OpenAI's tiktoken (Rust, as WASM) and js-tiktoken on the same text,
// in the same run, interleaved, one thread each: GPT-2 (and Llama-3: comigs vs tiktoken over Llama-3's
// vocabulary and pattern). The text is the multilingual fortunes of bench_corpus.txt.
//
//   node tools/tokenizer/speed.mjs BUILD/benchmarks/comigs-bench [rounds, default 3]
//
// Prints per round and the median and spread over rounds: MB/s by CPU time (the machine may be shared:
// CPU time is what one thread costs) and by wall time, and the ratios comigs / tiktoken and comigs /
// js-tiktoken. The comigs figures come from comigs-bench's tokenize/* cases (CPU time, Google Benchmark).
import fs from "fs";
import path from "path";
import { execFileSync } from "child_process";
import { fileURLToPath } from "url";
import { getEncoding } from "js-tiktoken";
import { get_encoding } from "tiktoken";
import { llama3Json, tiktokenFromJson, patterns } from "./oracles.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const bench = process.argv[2];
const rounds = Number(process.argv[3] ?? 3);
if (!bench || !fs.existsSync(bench)) {
  console.error("usage: node tools/tokenizer/speed.mjs PATH/TO/comigs-bench [rounds]");
  process.exit(2);
}

const files = fs.readFileSync(path.join(here, "bench_corpus.txt"), "utf8").split("\n").filter((l) => l && !l.startsWith("#"));
const text = files.map((f) => fs.readFileSync(f, "utf8")).join("");
const bytes = Buffer.byteLength(text);
console.log(`text: ${files.length} fortune files, ${(bytes / 1e6).toFixed(2)} MB`);

function timeIt(encode) {
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const n = encode(text).length;
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  const c = process.cpuUsage(c0);
  const cpu = (c.user + c.system) / 1e6;
  return { cpu: bytes / 1e6 / cpu, wall: bytes / 1e6 / wall, tokens: n };
}

function comigs() {
  const out = execFileSync(bench, ["--benchmark_filter=^tokenize/", "--benchmark_format=json", "--benchmark_min_time=1"],
                           { encoding: "utf8", maxBuffer: 1 << 26, env: { ...process.env, OMP_NUM_THREADS: "1" } });
  const r = {};
  for (const b of JSON.parse(out).benchmarks) {
    if (b.error_occurred) throw new Error(`${b.name}: ${b.error_message}`);
    const name = b.name.replace(/\/min_time.*$/, "");
    r[name] = { cpu: bytes / 1e6 / (b.cpu_time / 1e3), wall: bytes / 1e6 / (b.real_time / 1e3), tokens: b.tokens };
  }
  return r;
}

const tk = get_encoding("gpt2");
const js = getEncoding("gpt2");
const tkLlama = tiktokenFromJson(llama3Json(), patterns.llama3);
const runs = { "comigs gpt2": [], "tiktoken gpt2": [], "js-tiktoken gpt2": [], "comigs llama3": [], "tiktoken llama3": [] };
for (let r = 0; r < rounds; ++r) {
  const c = comigs();
  const got = {
    "comigs gpt2": c["tokenize/gpt2"],
    "tiktoken gpt2": timeIt((t) => tk.encode_ordinary(t)),
    "js-tiktoken gpt2": timeIt((t) => js.encode(t, [], [])),
    "comigs llama3": c["tokenize/llama3"],
    "tiktoken llama3": timeIt((t) => tkLlama.encode_ordinary(t)),
  };
  for (const [k, v] of Object.entries(got)) runs[k].push(v);
  if (got["comigs gpt2"].tokens !== got["tiktoken gpt2"].tokens || got["comigs llama3"].tokens !== got["tiktoken llama3"].tokens)
    console.log("WARNING: token counts differ between comigs and tiktoken");
  console.log(`round ${r + 1}: ` + Object.entries(got).map(([k, v]) => `${k} ${v.cpu.toFixed(2)}`).join(", ") + " MB/s (CPU)");
}

const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
const spread = (a) => `${Math.min(...a).toFixed(2)}-${Math.max(...a).toFixed(2)}`;
console.log(`\nmedian over ${rounds} rounds, one thread (MB/s; spread min-max):`);
for (const [k, v] of Object.entries(runs)) {
  const cpu = v.map((x) => x.cpu), wall = v.map((x) => x.wall);
  console.log(`  ${k.padEnd(18)} CPU ${median(cpu).toFixed(2).padStart(7)} (${spread(cpu)})   wall ${median(wall).toFixed(2).padStart(7)} (${spread(wall)})`);
}
const ratio = (a, b) => median(runs[a].map((x, i) => x.cpu / runs[b][i].cpu));
console.log(`\nratios (median of per-round CPU-time ratios):`);
console.log(`  comigs / tiktoken     gpt2   ${ratio("comigs gpt2", "tiktoken gpt2").toFixed(2)}x`);
console.log(`  comigs / js-tiktoken  gpt2   ${ratio("comigs gpt2", "js-tiktoken gpt2").toFixed(2)}x`);
console.log(`  comigs / tiktoken     llama3 ${ratio("comigs llama3", "tiktoken llama3").toFixed(2)}x`);
