#!/usr/bin/env node
// Reads GGUF files with the npm package @huggingface/gguf (an independent reader) and prints, per file,
// its metadata and tensor infos as JSON (bigints as strings). With --expect FILE.json, compares the
// listed keys and tensors against it instead and exits 1 on a difference.
//   cd tools && npm install --no-save @huggingface/gguf@0.4.6 && node gguf_check.mjs FILE.gguf ...
// (tools/check-gguf.sh does both.)
import { gguf } from "@huggingface/gguf";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";

const args = process.argv.slice(2);
let expect = null;
const files = [];
for (let i = 0; i < args.length; ++i) {
  if (args[i] === "--expect") expect = JSON.parse(readFileSync(args[++i], "utf8"));
  else files.push(args[i]);
}
const plain = (v) => (typeof v === "bigint" ? v.toString() : Array.isArray(v) ? v.map(plain) : v);
let failed = 0;
for (const f of files) {
  const { metadata, tensorInfos, tensorDataOffset } = await gguf(resolve(f), { allowLocalFile: true });
  const meta = {};
  for (const [k, v] of Object.entries(metadata)) meta[k] = plain(v);
  const tensors = tensorInfos.map((t) => ({
    name: t.name, shape: t.shape.map(plain), dtype: t.dtype, offset: plain(t.offset),
  }));
  const out = { file: f, metadata: meta, tensors, tensorDataOffset: plain(tensorDataOffset) };
  if (!expect) {
    console.log(JSON.stringify(out));
    continue;
  }
  const want = expect[f.split("/").pop()];
  if (!want) { console.error(`${f}: no expectation`); ++failed; continue; }
  for (const [k, v] of Object.entries(want.metadata ?? {})) {
    if (JSON.stringify(meta[k]) !== JSON.stringify(v)) {
      console.error(`${f}: metadata ${k} = ${JSON.stringify(meta[k])}, expected ${JSON.stringify(v)}`);
      ++failed;
    }
  }
  for (const w of want.tensors ?? []) {
    const t = tensors.find((x) => x.name === w.name);
    if (!t || JSON.stringify(t.shape) !== JSON.stringify(w.shape) || t.dtype !== w.dtype) {
      console.error(`${f}: tensor ${w.name} = ${JSON.stringify(t)}, expected ${JSON.stringify(w)}`);
      ++failed;
    }
  }
  console.log(`${f}: ${tensors.length} tensors, ${Object.keys(meta).length} metadata keys checked by @huggingface/gguf`);
}
if (failed) { console.error(`${failed} difference(s)`); process.exit(1); }
