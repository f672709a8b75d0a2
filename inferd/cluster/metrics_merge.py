"""Sum the Prometheus text of several replicas into one exposition (the ingress's /metrics).

Counters, histogram buckets/sums/counts and the request gauges add up across replicas; a `replicas` gauge tells how
many reported. Ratio gauges (KV cache usage) are averaged instead of summed. With per-text labels (`inferd serve
--workers` adds `worker="K"`) each text's samples stay their own series instead."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

AVERAGED = {"vllm:kv_cache_usage_perc"}


def merge_prometheus(texts: list[str],
                     count: tuple[str, str] = ("inferd_replicas", "Replicas whose metrics are merged here"),
                     text_labels: list[dict[str, str]] | None = None) -> str:
    """`count`: the name and help of the gauge that says how many texts were merged. `text_labels`: extra labels for
    each text's samples (e.g. `worker="1"`), which then stay separate series instead of adding up."""
    families: dict[str, tuple[str, str]] = {}  # name -> (type, help)
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for i, text in enumerate(texts):
        extra = text_labels[i] if text_labels else {}
        for fam in text_string_to_metric_families(text):
            if fam.name.endswith("_created"):
                continue  # creation timestamps do not add up
            families.setdefault(fam.name, (fam.type, fam.documentation))
            acc = sums.setdefault(fam.name, {})
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted({**s.labels, **extra}.items())))
                acc[key] = acc.get(key, 0.0) + s.value
    n = max(len(texts), 1)
    lines = [f"# HELP {count[0]} {count[1]}", f"# TYPE {count[0]} gauge", f"{count[0]} {len(texts)}"]
    for name, (typ, doc) in families.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {typ}")
        for (sname, labels), value in sums[name].items():
            if name in AVERAGED and not text_labels:
                value /= n
            lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sname}{{{lbl}}} {value!r}" if lbl else f"{sname} {value!r}")
    return "\n".join(lines) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
