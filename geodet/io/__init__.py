"""Everything that touches files: scenes (windowed raster reads), labels (vector files), chips,
and the writers of detections, reports and quicklooks."""
