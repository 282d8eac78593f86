"""TOV-VICReg's views: torchvision per image against the batched colour stage (selfsup.data.temporal).

Both make the four augmented stacks (x, y: A1/A2 of o_t; z, w: A3 of o_{t-3}, o_{t+3}) of the same
references from real Atari shards; the ratio is measured in one run, the two alternated repeat by
repeat, in single-thread CPU time (robust on a shared machine; a DataLoader worker runs one thread).

    python benchmarks/temporal_views.py --batch 256 --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", help="train shards of `submit shards atari` (default: the built-in frames)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import webdataset as wds

    from selfsup.data.atari import atari_cache
    from selfsup.data.stream import collate, expand_urls
    from selfsup.data.temporal import TemporalView, expand_chunks, tov_transforms, triplet

    urls = expand_urls(args.data or str(atari_cache("train")))
    refs = list(itertools.islice(expand_chunks(iter(wds.WebDataset(urls, shardshuffle=False))), args.batch))
    a1, a2, a3 = tov_transforms(84, (0.08, 1.0), 0.5)
    view = TemporalView(84, (0.08, 1.0), flip=0.5)

    def per_image():
        out = []
        for chunk, t in refs:
            *stacks, _ = triplet(chunk, t)
            cur, prev, nxt = (torch.from_numpy(a.copy()) for a in stacks)
            out.append((a1(cur), a2(cur), a3(prev), a3(nxt)))
        return out

    def batched():
        return view.batch(view.worker_batch(collate([view.sample(r) for r in refs])))

    times = {"per image": [], "batched": []}
    for _ in range(args.repeats):
        for name, fn in (("per image", per_image), ("batched", batched)):
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    per_image_s, batched_s = (statistics.median(times[k]) for k in ("per image", "batched"))
    print(f"| views of {args.batch} samples (4 stacks each) | per image (s) | batched (s) | batched / per image |")
    print("|---|---:|---:|---:|")
    print(f"| CPU time, 1 thread, median of {args.repeats} | {per_image_s:.3f} | {batched_s:.3f} | "
          f"{batched_s / per_image_s:.2f} |")


if __name__ == "__main__":
    main()
