"""DVC stage `tokenize_shards`: data/raw/ -> data/shards/{train,val}_NNNNNN.bin + manifest.json."""
from speedrun.errors import stage_main
from speedrun.params import load_section
from speedrun.tokenize import TokenizeParams, tokenize_shards

RAW_DIR = "data/raw"
SHARDS_DIR = "data/shards"


@stage_main
def main() -> None:
    params = load_section("tokenize", TokenizeParams)  # validated before any work
    tokenize_shards(params, RAW_DIR, SHARDS_DIR)


if __name__ == "__main__":
    main()
