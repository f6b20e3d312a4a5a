"""A Hugging Face style dataset card (README.md with YAML front matter) for a version, written
beside its data. Built from the manifest alone, so it is the same bytes for the same version."""

from __future__ import annotations

import yaml

# Hugging Face's size_categories tags, by upper bound
_SIZES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
]


def size_category(n: int) -> str:
    return next((tag for bound, tag in _SIZES if n < bound), "n>100M")


def dataset_card(manifest: dict) -> str:
    """README.md text: front matter (size, task, configs pointing at train.jsonl), what the version
    holds, where it came from and how it was made."""
    counts = manifest["counts"]
    recipe = manifest.get("recipe") or {}
    languages = (manifest.get("languages") or {}).get("shares") or {}
    front = {
        **(
            {"language": [c for c, share in languages.items() if share >= 0.01 and c != "un"]}
            if languages
            else {}
        ),
        "size_categories": [size_category(counts["kept"])],
        "task_categories": ["text-generation"],
        "tags": ["instruction-tuning", "chat", "curate"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "train.jsonl"}]}],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {recipe.get('name') or 'dataset'} ({manifest['version']})",
        "",
        recipe.get("description") or "An instruction dataset in one chat format, made by curate.",
        "",
        f"{counts['kept']:,} conversations in `train.jsonl` (OpenAI `messages` lines) and `data.parquet`,",
        f"kept of {counts['input']:,} input records: {counts['dropped']:,} dropped by the stages below",
        f"(each with its reason and evidence in `dropped.parquet`), {counts['quarantined']:,} unreadable",
        f"(`quarantine.jsonl`), {counts['synthetic']:,} synthetic.",
        "",
        _languages_line(manifest.get("languages")),
        "",
        "Licences are those of the sources below, which this card cannot state for you: check each",
        "before you publish.",
        "",
        "## Sources",
        "",
        "| input | format | records | sha256 |",
        "| --- | --- | ---: | --- |",
    ]
    for entry in manifest.get("inputs") or []:
        name = entry.get("name") or entry["path"]
        digest = (entry.get("sha256") or "-")[:16]
        where = f"{_cell(name)} (`{_cell(entry['path'])}`)"
        lines.append(f"| {where} | {entry['format']} | {entry['records']:,} | {digest} |")
    lines += ["", "## How it was made", "", "| stage | in | out | dropped |", "| --- | ---: | ---: | --- |"]
    for stage in manifest.get("stages") or []:
        reasons = ", ".join(f"{r}: {n:,}" for r, n in stage["dropped"].items()) or "-"
        lines.append(f"| {stage['name']} | {stage['in']:,} | {stage['out']:,} | {reasons} |")
    lines += [
        "",
        f"Parent version: {manifest.get('parent') or 'none'}."
        f" Code: curate {manifest.get('code_version', '?')}.",
        "",
        "The recipe, as run:",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _languages_line(languages: dict | None) -> str:
    if not languages or not languages.get("shares"):
        return "Languages: not measured."
    shares = ", ".join(f"{code} {share:.1%}" for code, share in list(languages["shares"].items())[:8])
    return f"Languages (CLD2 on a sample of {languages['sample']:,} records; un: not sure): {shares}."


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
