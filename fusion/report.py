"""FusionReport: what was fused, what was left and why, and what was removed."""
import html
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

__all__ = ["FusionReport", "FusedPair", "LeftNorm", "SCHEMA_VERSION"]

#: Version of the dict/JSON schema; bumped on any incompatible change.
SCHEMA_VERSION = 1


@dataclass
class FusedPair:
    """A norm folded into a layer. ``direction`` is ``"after"`` when the norm
    follows the layer and ``"before"`` when it feeds it."""

    norm: str
    layer: str
    direction: str
    evidence: str
    bias_added: bool = False
    untied: bool = False
    #: What took the norm's place: ``"Identity"``, or its remainder (timm's
    #: ``BatchNormAct2d`` leaves ``"Sequential(drop=Identity, act=SiLU)"``).
    replaced_by: str = "Identity"
    #: ``[start, stop]``: the norm's channels that this layer's output is, where
    #: the norm follows a ``torch.cat`` of several layers; None for all.
    channels: Optional[List[int]] = None


@dataclass
class LeftNorm:
    """A norm left as it was, with a reason code (see ``fusion.REASONS``)."""

    norm: str
    reason: str
    detail: str


@dataclass
class FusionReport:
    """The outcome of :func:`fusion.fuse` or :func:`fusion.analyze`.

    Every norm module of the model appears exactly once, in ``fused`` or in ``left``.
    """

    fused: List[FusedPair] = field(default_factory=list)
    left: List[LeftNorm] = field(default_factory=list)
    removed_parameters: Dict[str, int] = field(default_factory=dict)
    removed_buffers: Dict[str, int] = field(default_factory=dict)
    added_parameters: Dict[str, int] = field(default_factory=dict)
    evidence: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    dry_run: bool = False
    rel_err: Optional[float] = None
    max_abs_err: Optional[float] = None
    tolerance: Optional[float] = None
    #: What verification compared: ``"outputs"``, or ``"layers"`` where the
    #: outputs proved nothing (``verified_why``) and each fused layer was
    #: compared with the original on its own input instead.
    verified_by: Optional[str] = None
    verified_why: Optional[str] = None
    plan: Dict = field(default_factory=dict)

    @property
    def parameters_reduced(self) -> int:
        """Parameter elements removed, less the biases added to fused layers."""
        return sum(self.removed_parameters.values()) - sum(self.added_parameters.values())

    @property
    def buffers_removed(self) -> int:
        return sum(self.removed_buffers.values())

    @property
    def norms_fused(self) -> int:
        """How many norm modules were folded (a norm after a torch.cat of several
        layers is one norm and several pairs)."""
        return len({p.norm for p in self.fused})

    @property
    def nothing_to_do(self) -> bool:
        return not self.fused and not self.left

    def to_dict(self) -> Dict:
        """A JSON-serialisable dict with a stable schema (``schema_version``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "dry_run": self.dry_run,
            "evidence": list(self.evidence),
            "fused": [asdict(p) for p in self.fused],
            "left": [asdict(n) for n in self.left],
            "removed": {
                "parameters": dict(self.removed_parameters),
                "buffers": dict(self.removed_buffers),
                "parameter_count": sum(self.removed_parameters.values()),
                "buffer_count": self.buffers_removed,
            },
            "added": {"parameters": dict(self.added_parameters),
                      "parameter_count": sum(self.added_parameters.values())},
            "parameters_reduced": self.parameters_reduced,
            "verification": None if self.rel_err is None else {
                "rel_err": self.rel_err, "max_abs_err": self.max_abs_err,
                "tolerance": self.tolerance, "compared": self.verified_by,
                "why": self.verified_why},
            "notes": list(self.notes),
            "plan": self.plan,
        }

    def to_json(self, **kwargs) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def _summary(self) -> str:
        verb = "would fuse" if self.dry_run else "fused"
        if self.nothing_to_do:
            return "Nothing to fuse: the model has no norm modules left."
        removed, added = ("to remove", "to add") if self.dry_run else ("removed", "added")
        s = (f"{verb} {self.norms_fused} norm(s), left {len(self.left)}; "
             f"{sum(self.removed_parameters.values())} parameters and "
             f"{self.buffers_removed} buffer elements {removed}, "
             f"{sum(self.added_parameters.values())} bias parameters {added}")
        if self.verified_by == "layers":
            s += "; verified layer by layer (the outputs prove nothing: see the notes)"
        elif self.rel_err is not None:
            s += f"; rel_err {self.rel_err:.3g} (tolerance {self.tolerance:.3g})"
        return s

    def rows(self):
        """(status, norm, layer or reason, detail) rows for a table."""
        for p in self.fused:
            extra = []
            if p.bias_added:
                extra.append("bias added")
            if p.untied:
                extra.append("untied weight")
            if p.channels is not None:
                extra.append(f"its channels {p.channels[0]}:{p.channels[1]}, after a "
                             f"torch.cat")
            if p.replaced_by != "Identity":
                extra.append(f"replaced by {p.replaced_by}")
            rel = "after" if p.direction == "after" else "before"
            yield ("fused", p.norm, p.layer, f"{rel} layer, evidence {p.evidence}"
                   + (f", {', '.join(extra)}" if extra else ""))
        for n in self.left:
            yield ("left", n.norm, n.reason, n.detail)

    def __str__(self):
        rows = list(self.rows())
        lines = [f"FusionReport: {self._summary()}"]
        if self.evidence:
            lines.append(f"evidence: {', '.join(self.evidence)}")
        if rows:
            head = ("status", "norm", "layer / reason", "detail")
            widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(3)]
            fmt = "  {:<%d}  {:<%d}  {:<%d}  {}" % tuple(widths)
            lines.append(fmt.format(*head))
            lines.append(fmt.format(*("-" * w for w in widths), "-" * 6))
            lines += [fmt.format(*r) for r in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self):
        return f"<FusionReport {self._summary()}>"

    def _reasons(self) -> Dict[str, int]:
        """How many norms are left for each reason, most common first."""
        counts: Dict[str, int] = {}
        for n in self.left:
            counts[n.reason] = counts.get(n.reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def _repr_html_(self):
        """The report in a notebook: a summary, then the norms left (what people
        look for), then the fused pairs, folded away in a <details>. Text takes
        the page's own colour; only translucent greys are added, so it reads on
        Jupyter's light and dark themes alike."""
        esc = html.escape
        cell = "padding:2px 10px 2px 0;text-align:left;vertical-align:top;" \
               "border-bottom:1px solid rgba(127,127,127,.35)"
        code = "background:rgba(127,127,127,.18);padding:0 3px;border-radius:3px"

        def table(head, rows):
            th = "".join(f'<th style="{cell}">{esc(h)}</th>' for h in head)
            body = "".join("<tr>" + "".join(f'<td style="{cell}">{c}</td>' for c in r)
                           + "</tr>" for r in rows)
            return (f'<table style="border-collapse:collapse;margin:4px 0;color:inherit;'
                    f'font-size:inherit">'
                    f"<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>")

        verb = "would fuse" if self.dry_run else "fused"
        fused = self.norms_fused
        reasons = ", ".join(f'<code style="{code}">{esc(r)}</code> {n}'
                            for r, n in self._reasons().items())
        removed = "to remove" if self.dry_run else "removed"
        if self.verified_by == "layers":
            verified = ("verified layer by layer: each fused layer against the original "
                        f"on its own input, since {esc(self.verified_why or '')}")
        elif self.rel_err is not None:
            verified = (f"verified: rel_err {self.rel_err:.3g} &le; tolerance "
                        f"{self.tolerance:.3g}")
        else:
            verified = "not verified (pass example_inputs to verify)"
        items = [f"{verb} {fused} norm(s)",
                 f"left {len(self.left)}" + (f": {reasons}" if reasons else ""),
                 f"{self.parameters_reduced:,} parameters {removed} (net), "
                 f"{self.buffers_removed:,} buffer elements",
                 verified]
        if self.evidence:
            items.append(f"evidence: {esc(', '.join(self.evidence))}")
        parts = ['<div class="fusion-report" style="line-height:1.45">',
                 "<p style=\"margin:0 0 4px 0\"><b>FusionReport</b></p>",
                 '<ul style="margin:0 0 6px 0;padding-left:20px">'
                 + "".join(f"<li>{i}</li>" for i in items) + "</ul>"]
        if self.left:
            parts.append(f'<p style="margin:6px 0 0 0"><b>Left ({len(self.left)})</b></p>')
            parts.append(table(("norm", "reason", "detail"), [
                (esc(n.norm), f'<code style="{code}">{esc(n.reason)}</code>',
                 esc(n.detail)) for n in self.left]))
        if self.fused:
            rows = [(esc(p.norm), esc(p.layer), esc(how)) for p, how in
                    zip(self.fused, (r[3] for r in self.rows()))]
            parts.append(f'<details style="margin:6px 0"><summary style="cursor:pointer">'
                         f"<b>Fused ({len(self.fused)})</b></summary>"
                         + table(("norm", "layer", "how"), rows) + "</details>")
        if self.notes:
            parts.append('<ul style="margin:4px 0;padding-left:20px;opacity:.9">' + "".join(
                f"<li>note: {esc(n)}</li>" for n in self.notes) + "</ul>")
        return "".join(parts) + "</div>"
