#!/usr/bin/env python
"""Maintainer command: convert the original release archives into Hub-ready folders.

    python tools/convert_releases.py --all OUT_DIR
    python tools/convert_releases.py waffleiron-dinov2-L waffleiron-48-256-kitti OUT_DIR

Each registered archive is downloaded (or taken from the cache), checked,
converted into OUT_DIR/<name>/ (model.safetensors, config.json, README.md),
and the sha256 of every written file is printed as JSON, ready for the
``hub.files`` of the manifest entry once the folder is uploaded
(``huggingface-cli upload`` or ``scalr_zoo.load(folder).push_to_hub(repo)``).
"""

import scalr_zoo.convert

if __name__ == "__main__":
    raise SystemExit(scalr_zoo.convert.main())
