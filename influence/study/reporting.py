"""What a notebook hands to the pipeline: its findings, headline metrics, figures and timings.

A notebook makes one `Report`, right after `notebook_config`::

    cfg = notebook_config("02_sparsity_and_tails", globals())
    report = Report("02_sparsity_and_tails", preset=preset, device=device, seed=seed, params=cfg)
    with report.stage("tail_fits"):
        ...
    report.table(frame, caption="What the table shows.")        # "Table 1." on the page
    report.figure(fig, "headline", caption="What to look at.")  # "Figure 1.", caption = alt
    report.conclude(question=..., paper=..., here=..., findings=tails.findings(...),
                    reference="§5.2.1")
    report.save()

Creating the report applies the run context (`run_context.RunContext`: the thread count, where
metrics and figures go; written by the pipeline, or the manual defaults) and the figure style
(`style.apply`). `conclude` sets the notebook's verdict from its findings (`findings.overall`),
which the pipeline renders at the top of the page and in the index. At the `default` preset
figures end up in `figures/<notebook>/` (committed), at any other preset in
`artifacts/figures/<preset>/<notebook>/`.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from influence.io import atomic_path, atomic_write_json

from . import display as _display
from . import style
from .findings import Finding, overall
from .presets import check_preset
from .run_context import RunContext
from .stats import format_number

__all__ = ["Report"]

FIGURE_FORMATS = ("png", "svg")
MAX_HERE_WORDS = 60


def _jsonable(obj: Any) -> Any:
    """Best-effort conversion of numpy / torch scalars and arrays for JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "as_dict"):
        return _jsonable(obj.as_dict())
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and obj != obj:  # NaN is not valid JSON
        return None
    return obj


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels, from a PNG's header."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def _display_object(obj: Any) -> None:
    from IPython.display import display

    display(obj)


def _one_sentence(text: str, what: str) -> None:
    words = len(text.split())
    if words > MAX_HERE_WORDS or re.search(r"[.!?]\s+[A-Z]", text):
        raise ValueError(
            f"{what} must be one sentence of at most {MAX_HERE_WORDS} words (the index shows "
            f"it in one cell; details belong on the page); got {words} words: {text[:80]!r}…"
        )


class Report:
    """Collects one notebook run's findings, headline metrics, figures and stage times."""

    def __init__(
        self,
        notebook: str,
        *,
        preset: str,
        device: str = "cpu",
        seed: int = 0,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.notebook = notebook
        self.preset = check_preset(preset)
        self.device = device
        self.seed = seed
        self.params = dict(params or {})
        self.context = RunContext.current(notebook, self.preset)
        self.context.apply_threads()
        style.apply()
        self.metrics: dict[str, Any] = {}
        self.findings: list[Finding] = []
        self.summary: dict[str, str] = {}
        self.validation: dict[str, Any] | None = None
        self.stages: dict[str, float] = {}
        self.figures: dict[str, dict[str, Any]] = {}
        self.tables = 0
        self._started = time.perf_counter()

    @property
    def figure_dir(self) -> Path:
        return self.context.figure_dir

    @property
    def metrics_path(self) -> Path:
        return self.context.metrics_path

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; repeated names add up. Recorded even if the stage raises."""
        start = time.perf_counter()
        self.progress(f"stage {name}")
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def progress(self, message: str) -> None:
        """One line for the pipeline's console (nothing in the notebook or its report)."""
        self.context.progress(message)

    # -- figures and tables --------------------------------------------------------------------
    def _save(self, fig: Any, name: str, formats: Sequence[str]) -> list[Path]:
        import matplotlib

        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"figure name {name!r}: use letters, digits, '_' and '-' only")
        out = []
        for fmt in formats:
            path = self.figure_dir / f"{name}.{fmt}"
            kwargs: dict[str, Any] = {"bbox_inches": "tight"}
            if fmt == "svg":
                kwargs["metadata"] = {"Date": None}
            elif fmt == "png":
                kwargs["dpi"] = style.FIGURE_DPI
                kwargs["metadata"] = {"Software": None}
            with matplotlib.rc_context({"svg.hashsalt": "influence"}), atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, **kwargs)
            out.append(path)
        return out

    def figure(
        self,
        fig: Any,
        name: str,
        *,
        caption: str,
        formats: Sequence[str] = FIGURE_FORMATS,
        check: bool = True,
    ) -> None:
        """Save `fig` as `<name>.png` (and SVG), number it and show it with its caption.

        The page shows "Figure N. caption" under the image at its natural size (CSS inches),
        with the caption as alt text; the figure is then closed. A figure with a visible text
        under `style.MIN_FONT_PT` or wider than `style.MAX_WIDTH_IN` once saved is refused
        (ValueError naming the text), since the page would show it below 9 pt."""
        import matplotlib.pyplot as plt

        if not caption or not caption.strip():
            raise ValueError(f"figure {name!r} needs a caption: say what to look at")
        if name in self.figures:
            raise ValueError(f"figure name {name!r} is used twice in this notebook")
        if check:
            small = style.small_texts(fig)
            if small:
                shown = ", ".join(f"{t[:30]!r} at {s:g} pt" for t, s in small[:4])
                raise ValueError(
                    f"figure {name!r} has text below {style.MIN_FONT_PT:g} pt: {shown}; "
                    "remove the explicit font sizes (style.apply sets readable ones)"
                )
        paths = self._save(fig, name, formats)
        png = next((p for p in paths if p.suffix == ".png"), None)
        width = None
        if png is not None:
            width = round(png_size(png)[0] * style.CSS_PX_PER_INCH / style.FIGURE_DPI)
            if check and width > style.MAX_WIDTH_IN * style.CSS_PX_PER_INCH:
                raise ValueError(
                    f"figure {name!r} is {width / style.CSS_PX_PER_INCH:.1f} in wide as saved; "
                    f"the page shows at most {style.MAX_WIDTH_IN} in at natural size, so its "
                    "fonts would shrink below 9 pt: make it narrower"
                )
        number = len(self.figures) + 1
        self.figures[name] = {
            "files": [p.name for p in paths],
            "caption": caption.strip(),
            "number": number,
            "width": width,
        }
        if png is not None:
            _display_object(_display.raw_html(self._figure_html(png, number, caption, width)))
        plt.close(fig)

    @staticmethod
    def _figure_html(png: Path, number: int, caption: str, width: int | None) -> str:
        import html

        data = base64.b64encode(png.read_bytes()).decode("ascii")
        size = f' width="{width}"' if width else ""
        alt = html.escape(f"Figure {number}. {caption.strip()}", quote=True)
        return (
            f'<figure class="study-figure" id="figure-{number}">'
            f'<img src="data:image/png;base64,{data}"{size} alt="{alt}">'
            f"<figcaption><b>Figure {number}.</b> {html.escape(caption.strip())}</figcaption>"
            "</figure>"
        )

    def table(self, frame: Any, *, caption: str, **options: Any) -> None:
        """Show `frame` as a numbered HTML table ("Table N. caption"); `options` go to
        `display.table` (headers, digits, percent, formats, html_columns, index, ...)."""
        if not caption or not caption.strip():
            raise ValueError("a table needs a caption: say what it shows")
        self.tables += 1
        _display_object(_display.table(frame, caption=f"Table {self.tables}. {caption}", **options))

    def cite_validation(self, check: Any) -> None:
        """Cite, for every size the notebook uses, notebook 01's check of EK-FAC against exact
        CG (`validation_citation.cite_validation`): a table here, and its sentence in the
        report's answer, next to the verdict it qualifies."""
        self.validation = check.as_dict()
        shown = check.table.assign(
            pearson_ci=[
                f"[{format_number(v[0], 2)}, {format_number(v[1], 2)}]" if v else "n/a"
                for v in check.table["pearson_ci"]
            ]
        )
        self.table(
            shown,
            caption="EK-FAC against exact damped Gauss–Newton CG at each size this notebook "
            f"uses (notebook 01); 'tracks CG': the Pearson interval's lower end ≥ "
            f"{self.validation['threshold']:g}. Where a size was retrained with k added copies "
            "of training sequences: the slope and Pearson correlation of the actual change of "
            "log p(completion) against k × EK-FAC's predicted per-copy change (slope 1: a "
            "predicted nat per copy is a measured one).",
            headers={
                "status": "EK-FAC",
                "pearson_vs_cg": "Pearson vs CG",
                "pearson_ci": "95% interval",
                "spearman_vs_cg": "Spearman vs CG",
                "n_queries": "queries",
                "n_train": "training sequences",
                "cg_converged_share": "CG converged",
                "retrain_slope": "retrain slope",
                "retrain_pearson": "retrain Pearson",
                "retrain_pairs": "retrain pairs",
            },
            digits=2,
            percent=["cg_converged_share"],
        )

    # -- conclusions ---------------------------------------------------------------------------
    def conclude(
        self,
        *,
        question: str,
        paper: str,
        here: str,
        findings: Sequence[Finding],
        reference: str = "",
    ) -> None:
        """The notebook's answer: its question, the paper's finding (and where in the paper),
        ours in one sentence built from this run's numbers, and its findings, from which the
        verdict and its reason follow (`findings.overall`)."""
        findings = list(findings)
        if not all(isinstance(f, Finding) for f in findings):
            raise TypeError("findings must be a list of influence.study.findings.Finding")
        _one_sentence(here, "here (our finding)")
        verdict, reason = overall(findings)
        self.findings = findings
        self.summary = {
            "question": question,
            "paper": paper,
            "here": here,
            "verdict": verdict,
            "reason": reason,
            "reference": reference,
        }

    def as_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "notebook": self.notebook,
                "preset": self.preset,
                "device": self.device,
                "seed": self.seed,
                "params": self.params,
                "metrics": self.metrics,
                "summary": self.summary,
                "findings": [f.as_dict() for f in self.findings],
                "validation": self.validation,
                "stages": self.stages,
                "figures": self.figures,
                "threads": self.context.threads,
                "wall_time_s": time.perf_counter() - self._started,
            }
        )

    def save(self) -> None:
        """Write the metrics file atomically (call it as often as you like; last one wins).

        Returns None so that a trailing `report.save()` prints nothing into the notebook."""
        data = self.as_dict()
        json.dumps(data)  # fail here, in the notebook, if something is not serialisable
        atomic_write_json(self.metrics_path, data)

    def __repr__(self) -> str:
        return f"Report({self.notebook!r}, preset={self.preset!r}, stages={list(self.stages)})"
