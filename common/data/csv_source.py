"""A CSV table of images and labels (paths relative to the CSV's folder).

Accepted layouts (a header row is required; a ``split`` column, when present, selects rows):

* ``path,label``: ``label`` is a class index, a class name, or several joined by ``;`` (multi-label,
  an empty cell = no positive class). Names are mapped to indices in sorted order over the whole file.
* ``path,<class_a>,<class_b>,...`` (no ``label`` column): one 0/1 column per class, multi-label.
* no ``label`` column and other columns that are not all 0/1 (patient id, age, ...), or none: no labels. The
  CSV then serves unlabeled use (pretraining); labeled use is refused with ``label_problem``.

The image column is ``path`` (or ``image``/``file``/``filename``); other columns are ignored in the first layout.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from common.data.images import ImageDecodeError, read_image_file
from common.data.source import DataSourceError, Decoded, LabelInfo, RandomAccessSource

PATH_COLUMNS = ("path", "image", "file", "filename")


class CsvSource(RandomAccessSource):
    def __init__(self, path: Path, split: str | None, num_classes: int | None = None,
                 multilabel: bool | None = None):
        self.path = str(path)
        try:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataSourceError(f"{path}: cannot read CSV ({exc})") from exc
        if not rows:
            raise DataSourceError(f"{path}: no rows")
        header = list(rows[0].keys())
        path_col = next((c for c in PATH_COLUMNS if c in header), None)
        if path_col is None:
            raise DataSourceError(f"{path}: no image column (one of {PATH_COLUMNS}); header is {header}")
        self.split = split
        self.path_col = path_col
        self.label_problem: str | None = None  # why the labels cannot be used, if they cannot
        if "split" in header and split is not None:
            selected = [r for r in rows if r["split"] == split]
            if not selected:
                raise DataSourceError(f"{path}: no rows with split '{split}'")
        else:
            selected = rows
        base = path.parent
        self.files = [base / r[path_col] for r in selected]
        if "label" in header:
            self.targets, self.labels = self._label_column(rows, selected, num_classes, multilabel)
        else:
            self.targets, self.labels = self._class_columns(selected, header)

    def _label_column(self, rows: list[dict], selected: list[dict], num_classes: int | None,
                      multilabel: bool | None):
        def parts(cell: str | None) -> list[str]:
            return [p.strip() for p in (cell or "").split(";") if p.strip()]

        all_parts = [parts(r["label"]) for r in rows]
        is_multi = bool(multilabel) if multilabel is not None else any(len(p) > 1 for p in all_parts)
        empty = None if is_multi else next((i for i, p in enumerate(all_parts) if not p), None)
        if empty is not None:  # an error for labeled use only (build_dataset): pretraining ignores labels
            self.label_problem = (f"{self.path}: line {empty + 2} ({rows[empty].get(self.path_col)}) has an empty "
                                  f"label; single-label data needs one per row (for multi-label data, where an "
                                  f"empty label means no finding, pass --multilabel)")
        values = sorted({v for p in all_parts for v in p})
        if all(v.lstrip("-").isdigit() for v in values):
            names = None
            index = {v: int(v) for v in values}
            k = num_classes if num_classes is not None else (max(index.values()) + 1 if index else 0)
        else:
            names = values
            index = {v: i for i, v in enumerate(values)}
            k = num_classes if num_classes is not None else len(values)
            if k != len(values):
                raise DataSourceError(f"{self.path}: {len(values)} class names {values} but num_classes={k}")
        # Names come from every row, so a typo in val/test adds a class; transfer checks it against train.
        derived = "names" if names is not None else ("indices" if num_classes is None else None)
        targets = []
        for r in selected:
            p = parts(r["label"])
            if not is_multi and len(p) > 1:
                raise DataSourceError(f"{self.path}: row {r} has {len(p)} labels in single-label mode")
            targets.append([index[v] for v in p] if is_multi else (index[p[0]] if p else None))
        return targets, LabelInfo(num_classes=k, class_names=names, multilabel=is_multi, derived=derived)

    def _class_columns(self, selected: list[dict], header: list[str]):
        class_cols = [c for c in header if c not in (self.path_col, "split")]
        hint = (f"name the column holding the class 'label' (the CSV's columns: {header}; without labels it "
                f"serves unlabeled pretraining only)")
        if not class_cols:
            self.label_problem = f"{self.path}: no 'label' column and no 0/1 class columns; {hint}"
        targets = []
        for r in selected:
            bad = next((c for c in class_cols if (r[c] or "").strip() not in ("0", "1", "0.0", "1.0")), None)
            if bad is not None:
                self.label_problem = (f"{self.path}: no 'label' column, so {class_cols} are read as one 0/1 column "
                                      f"per class (multi-label), but {r[self.path_col]} has {bad}={r[bad]!r}; {hint}")
                break
            targets.append(np.asarray([int(float(r[c])) for c in class_cols], dtype=np.int64))
        if self.label_problem:  # metadata, not labels: pretraining reads no labels; build_dataset refuses labeled use
            return [None] * len(selected), LabelInfo()
        return targets, LabelInfo(num_classes=len(class_cols), class_names=class_cols, multilabel=True)

    def num_samples(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Decoded:
        target = self.targets[index]
        if isinstance(target, list):  # multi-label given as class indices
            vec = np.zeros(self.labels.num_classes or 0, dtype=np.float32)
            vec[target] = 1.0
            target = vec
        file = self.files[index]
        if not file.exists():
            raise ImageDecodeError(f"{file}: file not found (listed in {self.path}; relative paths are read "
                                   f"from the CSV's folder {Path(self.path).parent})")
        return Decoded(pixels=read_image_file(file), label=target, key=str(file))
