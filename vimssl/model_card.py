"""Model cards for vimssl Hub folders: YAML front matter and the sections a user reads (what the
model is, how it was trained, measured results, how to load it, licence). Built with
``huggingface_hub.ModelCard`` (imported when a card is made)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vimssl.models.vim import VisionMamba


def _find(tree: object, names: Sequence[str]) -> object:
    """The first scalar value under any of ``names`` in a nested dict/list (depth first)."""
    if isinstance(tree, Mapping):
        for key in names:
            if key in tree and isinstance(tree[key], str | int | float | list):
                return tree[key]
        children = tree.values()
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    return next((v for v in (_find(c, names) for c in children) if v is not None), None)


def model_card(
    model: VisionMamba,
    config: Mapping,
    *,
    training: Mapping | str | None = None,
    metrics: Mapping[str, float | str] | None = None,
    license: str = "apache-2.0",
    repo_id: str = "<repo>",
    tags: Sequence[str] = ("self-supervised",),
):
    """A ``huggingface_hub.ModelCard`` for a vimssl Hub folder."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    if isinstance(training, str):
        text = training.strip()
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = None
    else:
        parsed = dict(training) if training else None
        text = yaml.safe_dump(parsed, sort_keys=False).strip() if parsed else ""
    method = _find(parsed, ("method",))
    dataset = _find(parsed, ("dataset", "dataset_name"))
    epochs = _find(parsed, ("epochs", "max_epochs"))
    classifier = model.num_classes > 0
    task = "image-classification" if classifier else "image-feature-extraction"
    datasets = [dataset] if isinstance(dataset, str) else dataset if isinstance(dataset, list) else None
    data = ModelCardData(
        library_name="vimssl", license=license, pipeline_tag=task,
        tags=list(dict.fromkeys(["vision-mamba", task, *tags])), datasets=datasets,
        metrics=list(metrics) if metrics else None,
    )  # fmt: skip
    args = config["model_args"]
    params = sum(p.numel() for p in model.parameters())
    what = (
        f"a Vision Mamba (Vim) image classifier over {model.num_classes} classes"
        if classifier
        else "a Vision Mamba (Vim) image encoder (feature extractor, no classification head)"
    )
    h, w = config["image_size"]
    lines = [
        f"# {repo_id.rstrip('/').rsplit('/', 1)[-1]}",
        "",
        f"This is {what}, saved with vimssl. Vision Mamba ([Zhu et al. 2024]"
        "(https://arxiv.org/abs/2401.09417)) is a bidirectional state-space encoder with a cls token "
        "in the middle of the patch sequence.",
        "",
        "| | |", "|---|---|",
        f"| architecture | `{config['architecture']}` |",
        f"| parameters | {params / 1e6:.2f} M |",
        f"| image size | {h} x {w} |",
        f"| patch size / stride | {args['patch_size']} / {args['stride']} |",
        f"| width / depth / state size | {args['embed_dim']} / {args['depth']} / {args['d_state']} |",
        f"| output | {'logits over the classes' if classifier else 'the cls feature'} (`model(images)`) |",
        f"| normalisation | mean {config['mean']}, std {config['std']} |",
        "",
        "## Training",
        "",
    ]  # fmt: skip
    if parsed or text:
        facts = [
            (k, v) for k, v in (("method", method), ("dataset", dataset), ("epochs", epochs)) if v is not None
        ]
        lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), ""] if facts else []
        lines += ["Training configuration:", "", "```yaml", text, "```", ""]
    else:
        lines += ["No training information was recorded.", ""]
    if metrics:
        lines += [
            "## Results",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in metrics.items()),
            "",
        ]
    use = "logits = model(images)  # (B, num_classes)" if classifier else "cls = model(images)  # (B, D)"
    lines += [
        "## How to use",
        "",
        "```python",
        "import vimssl",
        "",
        f'model = vimssl.from_pretrained("{repo_id}").eval()',
        f"# images: (B, {args['in_chans']}, H, W) in [0, 1], normalised with config.json's mean / std",
        use,
        "feats = model.forward_features(images)  # (B, M + 1, D), cls token at index M // 2",
        "```",
        "",
        "## Licence",
        "",
        f"`{license}`.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# -------------------------------------------------------------------------------------------- push
