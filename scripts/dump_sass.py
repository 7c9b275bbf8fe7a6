"""Disassemble the built extension's kernels whose names match a pattern (on the device machine,
where cuobjdump is; this machine has none), one file per kernel with an instruction histogram at
its top: what the compiler made of a change, without a profiler run.

    python3 scripts/dump_sass.py 'gemm_4bit_skinny.*bfloat16Li1ELi1ELb1' $OUT/sass
"""
import collections
import glob
import os
import re
import subprocess
import sys


def main():
    pattern, out_dir = re.compile(sys.argv[1]), sys.argv[2]
    so = glob.glob(os.path.join(os.path.dirname(__file__), "..", "lowrank", "_C*.so"))[0]
    text = subprocess.run(["cuobjdump", "-sass", so], capture_output=True, text=True, check=True).stdout
    os.makedirs(out_dir, exist_ok=True)
    for block in text.split("\t\tFunction : ")[1:]:
        name = block.split("\n", 1)[0].strip()
        if not pattern.search(name):
            continue
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", block)
        hist = collections.Counter(op.split(".")[0] for op in ops)
        head = f"// {name}\n// {len(ops)} instructions: " + ", ".join(f"{k} {v}" for k, v in hist.most_common()) + "\n"
        path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_]", "_", name)[-120:] + ".sass")
        with open(path, "w") as f:
            f.write(head + block)
        print(f"{len(ops):6d} {name}")


if __name__ == "__main__":
    main()
