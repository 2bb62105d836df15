#!/usr/bin/env python3
"""Generates the Unicode tables of comigs' tokenizers from Debian's Unicode Character Database.

Usage: tools/gen_unicode_tables.py [UCD dir, default /usr/share/unicode]   (Debian package `unicode-data`)
Writes, under include/comigs/text/detail/:
- unicode_tables.hpp: the classes the pre-tokenizer patterns need: \\p{L} (general categories Lu Ll Lt
  Lm Lo), \\p{N} (Nd Nl No) and \\s (the White_Space property, which is what Rust's regex, Oniguruma and
  ICU use for \\s); everything else, unassigned code points included, is class Other. Two-stage: code
  point >> 7 picks one of the distinct 128-entry blocks, each entry the class of one code point (2 bits,
  four to a byte).
- normalization_tables.hpp: what NFC needs (UAX #15): canonical combining classes and the NFC_QC
  property (two-stage, a byte each), full canonical decompositions (Hangul syllables are algorithmic),
  and the primary composites (canonical pairs that are not Full_Composition_Exclusion).
"""
import os
import re
import sys

OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3
BLOCK_SHIFT = 7
BLOCK = 1 << BLOCK_SHIFT
MAX_CP = 0x110000


def read_version(ucd):
    with open(os.path.join(ucd, "PropList.txt"), encoding="utf-8") as f:
        m = re.search(r"PropList-(\d+\.\d+\.\d+)\.txt", f.readline())
    if not m:
        sys.exit("cannot read the Unicode version from PropList.txt")
    return m.group(1)


def read_classes(ucd):
    cls = bytearray(MAX_CP)
    with open(os.path.join(ucd, "UnicodeData.txt"), encoding="utf-8") as f:
        first = None
        for line in f:
            fields = line.split(";")
            cp, name, cat = int(fields[0], 16), fields[1], fields[2]
            value = LETTER if cat[0] == "L" else NUMBER if cat[0] == "N" else OTHER
            if name.endswith(", First>"):
                first = cp
                continue
            lo = first if name.endswith(", Last>") else cp
            first = None
            for c in range(lo, cp + 1):
                cls[c] = value
    with open(os.path.join(ucd, "PropList.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line:
                continue
            rng, prop = [s.strip() for s in line.split(";")]
            if prop != "White_Space":
                continue
            lo, _, hi = rng.partition("..")
            for c in range(int(lo, 16), int(hi or lo, 16) + 1):
                assert cls[c] == OTHER, f"U+{c:04X} is White_Space and a letter or number"
                cls[c] = SPACE
    return cls


def two_stage(values, shift):
    """Distinct blocks of 1 << shift entries, and the block index of each run."""
    block = 1 << shift
    blocks, index, seen = [], [], {}
    for b in range(MAX_CP // block):
        chunk = bytes(values[b * block:(b + 1) * block])
        if chunk not in seen:
            seen[chunk] = len(blocks)
            blocks.append(chunk)
        index.append(seen[chunk])
    assert len(blocks) <= 256
    return blocks, index


def write_array(out, ctype, name, values, doc):
    out.write(f"/// {doc}\n")
    out.write(f"inline constexpr {ctype} {name}[{len(values)}] = {{\n")
    for i in range(0, len(values), 24):
        out.write("    " + ",".join(str(v) for v in values[i:i + 24]) + ",\n")
    out.write("};\n\n")


def write_normalization(ucd, version, path):
    ccc = bytearray(MAX_CP)
    decomp = {}
    with open(os.path.join(ucd, "UnicodeData.txt"), encoding="utf-8") as f:
        for line in f:
            fields = line.split(";")
            cp = int(fields[0], 16)
            ccc[cp] = int(fields[3])
            if fields[5] and not fields[5].startswith("<"):
                decomp[cp] = [int(x, 16) for x in fields[5].split()]
    exclusions, qc = set(), bytearray(MAX_CP)  # qc: 0 yes, 1 no, 2 maybe
    with open(os.path.join(ucd, "DerivedNormalizationProps.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(";")]
            lo, _, hi = parts[0].partition("..")
            rng = range(int(lo, 16), int(hi or lo, 16) + 1)
            if parts[1] == "Full_Composition_Exclusion":
                exclusions.update(rng)
            elif parts[1] == "NFC_QC":
                for c in rng:
                    qc[c] = 1 if parts[2] == "N" else 2

    def full(cp):
        return [y for x in decomp[cp] for y in (full(x) if x in decomp else [x])]

    composites = sorted((a[0] << 21 | a[1], cp) for cp, a in decomp.items()
                        if len(a) == 2 and cp not in exclusions)
    props = bytearray(MAX_CP)
    for c in range(MAX_CP):
        props[c] = ccc[c]
    ccc_blocks, ccc_index = two_stage(props, 7)
    qc_blocks, qc_index = two_stage(qc, 7)
    keys = sorted(decomp)
    offsets, pool = [], []
    for cp in keys:
        offsets.append(len(pool))
        pool.extend(full(cp))
    offsets.append(len(pool))

    with open(path, "w", encoding="utf-8") as out:
        out.write("#pragma once\n")
        out.write(f"// Generated by tools/gen_unicode_tables.py from the Unicode Character Database {version}\n")
        out.write("// (Debian package unicode-data): do not edit. NFC data: combining classes, NFC_QC, canonical\n")
        out.write("// decompositions (fully decomposed), primary composites.\n")
        out.write("#include <cstdint>\n\nnamespace comigs::text::detail {\n\n")
        write_array(out, "std::uint8_t", "ccc_block_index", ccc_index, "Canonical combining class: block of code point >> 7.")
        write_array(out, "std::uint8_t", "ccc_blocks", [b for blk in ccc_blocks for b in blk],
                    f"{len(ccc_blocks)} blocks of 128 classes.")
        write_array(out, "std::uint8_t", "nfc_qc_block_index", qc_index, "NFC_QC (0 yes, 1 no, 2 maybe): block of code point >> 7.")
        write_array(out, "std::uint8_t", "nfc_qc_blocks", [b for blk in qc_blocks for b in blk],
                    f"{len(qc_blocks)} blocks of 128 values.")
        write_array(out, "std::uint32_t", "decomposed_code_points", keys,
                    "Code points with a canonical decomposition (Hangul syllables aside), ascending.")
        write_array(out, "std::uint16_t", "decomposition_offsets", offsets,
                    "Their full decompositions: decomposition_pool[offsets[i], offsets[i + 1]).")
        write_array(out, "std::uint32_t", "decomposition_pool", pool, "Fully decomposed sequences.")
        write_array(out, "std::uint64_t", "composition_pairs", [k for k, _ in composites],
                    "Primary composites: first << 21 | second, ascending ...")
        write_array(out, "std::uint32_t", "composition_results", [v for _, v in composites], "... and what each pair composes to.")
        out.write("}  // namespace comigs::text::detail\n")


def main():
    ucd = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/unicode"
    version = read_version(ucd)
    detail = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "include", "comigs", "text", "detail")
    write_normalization(ucd, version, os.path.join(detail, "normalization_tables.hpp"))
    cls = read_classes(ucd)
    blocks, index = [], []
    seen = {}
    for b in range(MAX_CP // BLOCK):
        chunk = bytes(cls[b * BLOCK:(b + 1) * BLOCK])
        if chunk not in seen:
            seen[chunk] = len(blocks)
            blocks.append(chunk)
        index.append(seen[chunk])
    assert len(blocks) <= 256
    packed = bytearray()
    for chunk in blocks:
        for i in range(0, BLOCK, 4):
            packed.append(chunk[i] | chunk[i + 1] << 2 | chunk[i + 2] << 4 | chunk[i + 3] << 6)

    out = open(os.path.join(detail, "unicode_tables.hpp"), "w", encoding="utf-8")
    out.write("#pragma once\n")
    out.write(f"// Generated by tools/gen_unicode_tables.py from the Unicode Character Database {version}\n")
    out.write("// (Debian package unicode-data): do not edit. Classes: 0 other, 1 \\p{L}, 2 \\p{N}, 3 White_Space.\n")
    out.write("#include <cstdint>\n\nnamespace comigs::text::detail {\n\n")
    out.write(f'inline constexpr const char* unicode_version = "{version}";\n')
    out.write(f"inline constexpr int class_block_shift = {BLOCK_SHIFT};\n\n")
    out.write(f"/// Block of each run of {BLOCK} code points (code point >> {BLOCK_SHIFT}).\n")
    out.write(f"inline constexpr std::uint8_t class_block_index[{len(index)}] = {{\n")
    for i in range(0, len(index), 32):
        out.write("    " + ",".join(str(v) for v in index[i:i + 32]) + ",\n")
    out.write("};\n\n")
    out.write(f"/// {len(blocks)} distinct blocks, {BLOCK // 4} bytes each: code point i of a block in bits 2 (i % 4) of byte i / 4.\n")
    out.write(f"inline constexpr std::uint8_t class_blocks[{len(packed)}] = {{\n")
    for i in range(0, len(packed), 32):
        out.write("    " + ",".join(str(v) for v in packed[i:i + 32]) + ",\n")
    out.write("};\n\n}  // namespace comigs::text::detail\n")
    out.close()


if __name__ == "__main__":
    main()
