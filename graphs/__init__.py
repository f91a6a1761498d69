"""Attribution graphs built on `replacement`: attribution, pruning, QK pairs, patching, export."""
