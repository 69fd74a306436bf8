"""Print the fastest tiles of a ``bench_gemv.py --output`` file per shape and M, beside the picked tile:
``python3 scripts/sweep_top.py FILE [N]`` (N tiles each, default 6). For reading a sweep's result in a device
call's output without its full log."""

import json
import sys


def main() -> None:
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6
    for r in json.load(open(path))["rows"]:
        print(f"{r['shape']} M={r['M']}: floor {r['floor_us']:.2f}  picked {r['default_us']:.2f}  "
              f"cuBLAS {r['cublas_us']:.2f}")
        for cfg, us in sorted(r["tried"], key=lambda t: t[1])[:top]:
            keys = ("block_n", "block_k", "num_warps", "num_stages", "split_k", "swap", "group", "persistent", "tma",
                    "late_trigger")
            print(f"    {us:6.2f} ({us / r['floor_us']:.3f}x)  " + " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg))


if __name__ == "__main__":
    main()
