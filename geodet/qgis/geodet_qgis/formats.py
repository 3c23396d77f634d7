"""The vector formats geodet writes that this QGIS opens."""

BASE = ["gpkg", "geojson", "fgb", "shp", "csv"]


def detection_extensions() -> list:
    """geodet's output formats this QGIS can open: GeoParquet only where its GDAL has Arrow
    (QGIS 3.28+ builds from qgis.org or conda; not Debian 12's 3.22)."""
    from qgis.core import QgsVectorFileWriter

    readable = {e.lower() for e in QgsVectorFileWriter.supportedFormatExtensions()}
    return BASE + (["parquet"] if "parquet" in readable else [])


CELL_EXTENSIONS = ["gpkg", "geojson", "fgb", "shp"]  # geodet suggest refuses the others
