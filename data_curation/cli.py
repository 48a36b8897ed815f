"""``curate INPUT... --output OUT [--workers N] [...]``: heterogeneous medical images -> WebDataset shards.
``curate --merge PART_DIR... --output OUT``: combine finished curate outputs (e.g. of a Slurm job array)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from common.config import ConfigError, build_parser, parse_config
from data_curation.config import CurateConfig
from data_curation.deid import SaltError
from data_curation.manifest import source_names, summary_table
from data_curation.merge import merge
from data_curation.run import curate
from data_curation.state import replay_ledger


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(CurateConfig, prog="curate", description=__doc__)
    parser.add_argument("paths", nargs="*", help="input folders or files (added to --inputs)")
    args = sys.argv[1:] if argv is None else argv
    paths = parser.parse_args(args).paths
    # pydicom warns about deviations it has already repaired (implicit VR, padding, odd IS values); on real
    # archives that is thousands of lines hiding the summary. Real failures still reach rejects.jsonl.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    try:
        cfg = parse_config(CurateConfig, args, parser)
        cfg.inputs = list(cfg.inputs) + list(paths)
        if cfg.merge:
            if cfg.inputs:
                raise ConfigError("--merge combines finished outputs; it takes no inputs "
                                  f"(got {cfg.inputs[:3]})")
            manifest = merge(list(cfg.merge), cfg.output, cfg.progress)
        else:
            manifest = curate(cfg)
    except (ConfigError, SaltError, ValueError) as exc:
        print(f"curate: error: {exc}", file=sys.stderr)
        return 2
    # The readable names come from the ledger (operator-only); the manifest holds their labels.
    print(summary_table(manifest, source_names(replay_ledger(Path(cfg.output).expanduser()))))
    if not manifest["samples_written"]:
        print(f"curate: warning: {cfg.output} holds no samples: every input was rejected or a duplicate "
              f"(reasons in {Path(cfg.output) / 'rejects.jsonl'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
