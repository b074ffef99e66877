"""Sum a cubecl kernel profile by kernel: which kernels a run's GPU time goes to.

    python3 scripts/profile_summary.py PROFILE_LOG [--top N]

PROFILE_LOG is what `RFSTUDIO_PROFILE_LOG=file rfstudio ...` (or cubecl's own `CUBECL_DEBUG_LOG`
with `CUBECL_DEBUG_OPTION=profile`) wrote: one line per kernel launch, `| 1.234ms | Name | ... |`
(cubecl synchronises after every kernel while profiling, so the times are each kernel's own).
Prints, per kernel name, launches, total ms, share of the total and mean us, largest first, then
the total. Lines of any other kind (compiled sources, autotune) are ignored. Reads xz files too.
"""
import argparse
import collections
import lzma
import re
import sys

UNIT_MS = {"s": 1e3, "ms": 1.0, "µs": 1e-3, "us": 1e-3, "ns": 1e-6}
TIME = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(ms|µs|us|ns|s)$")


def parse(lines):
    """(kernel name, milliseconds) for every profile line."""
    for line in lines:
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        m = TIME.match(cells[0])
        if m:
            yield cells[1], float(m.group(1)) * UNIT_MS[m.group(2)]


def summarise(pairs, top):
    total = collections.Counter()
    launches = collections.Counter()
    for name, ms in pairs:
        total[name] += ms
        launches[name] += 1
    whole = sum(total.values())
    rows = [f"{'kernel':32} {'launches':>9} {'total ms':>11} {'share':>6} {'mean us':>9}"]
    for name, ms in total.most_common(top):
        rows.append(f"{name[:32]:32} {launches[name]:9d} {ms:11.2f} {100 * ms / whole:5.1f}% {1e3 * ms / launches[name]:9.1f}")
    rows.append(f"{'all kernels':32} {sum(launches.values()):9d} {whole:11.2f} {100.0 if whole else 0.0:5.1f}%")
    return "\n".join(rows)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    opener = lzma.open if a.log.endswith(".xz") else open
    try:
        with opener(a.log, "rt", errors="replace") as f:
            print(summarise(parse(f), a.top))
    except OSError as e:
        print(f"cannot read {a.log}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
