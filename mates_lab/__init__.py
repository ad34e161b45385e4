"""mates-lab: the research side of mates-megatron (benchmarks, the demo, the DAM market, planted facts, the
embedded corpus builder). It imports the plugin (``mates_megatron``); the plugin never imports it."""
