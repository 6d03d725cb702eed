"""Encoding the label vocabularies: with CLIP's own tokenizer and the tiny test one, in order and shortest first.

    python -m bench.vocabulary           # full-size CLIP ViT-B/32 (random weights) with CLIP's own
                                         # tokenizer and with the tiny test one, bf16 where the CPU has it
    python -m bench.vocabulary --quick   # the tiny CLIP: a plumbing check

A run encodes its object and scene vocabularies (424 prompts by default) before its first
result, unless `models.text_cache` holds them from an earlier run with the same model: the
first run on a machine, every run with `text_cache: off` (the benchmarks' runs), and each new
label list pay it. The text encoder's cost grows with the prompts' tokens, so this says what
the tokenizer of the benchmarks' models does to it (`bench.models.clip_tokenizer`). It also
times a way the product does not take: `VideoTextModel._text_features` pads 256 texts a pass,
in their order, to the longest of them; "shortest first" sorts them by length and encodes 64
a pass, each padded to its own longest. The two run interleaved; the cosine says how far
their embeddings are apart (bf16 rounds differently in differently shaped passes).
"""

from __future__ import annotations

import statistics

import torch

from bench.common import CACHE, Report, arguments, interleaved_medians, on_thread
from schemas.config import RunConfig

#: texts a pass of the shortest-first way, each pass padded to its own longest
SORTED_PER_PASS = 64


def prompts(config: RunConfig) -> list[str]:
    """The default object and scene vocabularies' prompts, each name in each template."""
    labels = config.labels
    return [template.replace("{}", name)
            for names, templates in ((labels.objects, labels.object_templates), (labels.scenes, labels.scene_templates))
            for name in names for template in templates]


@torch.inference_mode()
def shortest_first(model, texts: list[str]) -> torch.Tensor:
    """The pooled text features of `texts` (in their order), encoded shortest first."""
    from workers.embedding import _pooled

    lengths = [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=model.text_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    rows = []
    for start in range(0, len(texts), SORTED_PER_PASS):
        tokens = model.tokenizer([texts[i] for i in order[start : start + SORTED_PER_PASS]], padding=True,
                                 truncation=True, max_length=model.text_length, return_tensors="pt")
        inputs = {key: value.to(model.device) for key, value in tokens.items()}
        rows.append(_pooled(model.model.get_text_features(**inputs)))
    features = torch.cat(rows)
    return features[torch.tensor(sorted(range(len(texts)), key=order.__getitem__), device=features.device)]


def rows(models: dict[str, str], repeats: int) -> list[list[object]]:
    """A row a model: its prompts' lengths, each way's median seconds, their ratio, the cosine, and
    its time in order against the first model's; every model's ways in one interleaved series."""
    from workers.embedding import VideoTextModel

    loaded, ways, facts = {}, {}, {}
    for name, folder in models.items():
        config = RunConfig.from_dict({"models": {"embed": folder, "device": "cpu", "text_cache": "off"}})
        model = loaded[name] = VideoTextModel(config.models)
        texts = prompts(config)
        ways[name, "in order"] = lambda model=model, texts=texts: on_thread(lambda: model._text_features(texts))
        ways[name, "shortest first"] = lambda model=model, texts=texts: on_thread(lambda: shortest_first(model, texts))
        in_order, sorted_ = ways[name, "in order"](), ways[name, "shortest first"]()
        lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
        facts[name] = (len(texts), statistics.mean(lengths), max(lengths),
                       torch.nn.functional.cosine_similarity(in_order.float(), sorted_.float()).min().item())
    seconds = interleaved_medians(ways, repeats)
    first = next(iter(models))
    return [[name, count, f"{mean:.1f}", longest, str(loaded[name].dtype).split(".")[-1],
             f"{seconds[name, 'in order']:.2f}", f"{seconds[name, 'in order'] / seconds[first, 'in order']:.2f}x",
             f"{seconds[name, 'shortest first']:.2f}",
             f"{seconds[name, 'in order'] / seconds[name, 'shortest first']:.2f}x", f"{cosine:.6f}"]
            for name, (count, mean, longest, cosine) in facts.items()]


def main(argv: list[str] | None = None) -> int:
    """Time both ways with each model, print the table and append it to docs/benchmarks.md."""
    parser = arguments(__doc__, "the tiny CLIP, one round: a plumbing check", repeats=5)
    args = parser.parse_args(argv)
    if args.quick:
        from workers.tiny_models import build_tiny_clip

        models = {"tiny CLIP, tiny tokenizer": str(build_tiny_clip(CACHE / "models" / "tiny-clip"))}
        repeats = 1
    else:
        from bench.models import fullsize_clip

        models = {"CLIP ViT-B/32, CLIP's tokenizer": str(fullsize_clip()),
                  "CLIP ViT-B/32, tiny test tokenizer": str(fullsize_clip(own_tokenizer=False))}
        if len(set(models.values())) == 1:  # (CLIP's merges could not be fetched)
            del models["CLIP ViT-B/32, CLIP's tokenizer"]
        repeats = args.repeats
    report = Report("Encoding the label vocabularies: the tokenizer, and passes shortest first", args.quick,
                    args.doc)
    report.add_table(
        ["model, tokenizer", "prompts", "tokens a prompt (mean)", "longest", "dtype", "in order (s)",
         "in order, / the first row's", "shortest first (s)", "in order / shortest first", "cosine (min)"],
        rows(models, repeats),
        f"The default object and scene vocabularies on the CPU, each way on a thread as a run's stage, median of "
        f"{repeats} interleaved rounds; in order: the product's `_text_features`, 256 prompts a pass; shortest "
        f"first: sorted by length, {SORTED_PER_PASS} a pass.",
    )
    report.publish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
