"""The torch backend: sort-based dispatch, then grouped GEMMs (``torch._grouped_mm``) or a loop over active experts."""
