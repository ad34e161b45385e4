"""Domain mixtures: weight files, the mixture selector that serves them, and the planners that write them
(DDO and AutoScale, `mates-megatron mixture plan|run|fit|predict`)."""
