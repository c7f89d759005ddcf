"""DVC stage `download`: params.yaml `download` -> data/raw/ (parquet of raw text + manifest.json).

Resumable: interrupted and re-run (or `dvc repro` again), it continues where it stopped.
"""
from speedrun.download import DownloadParams, download
from speedrun.errors import stage_main
from speedrun.params import load_section

RAW_DIR = "data/raw"


@stage_main
def main() -> None:
    params = load_section("download", DownloadParams)  # validated before any work
    download(params, RAW_DIR)


if __name__ == "__main__":
    main()
