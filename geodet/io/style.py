"""The default QGIS style of detection layers: outlines only (cars and crowns stay visible under
them), one colour per class, line width growing with the score, and the score as a label when
zoomed in. With the model's operating point (the best-F1 score at validation), only detections
scoring at least that are drawn, as the quicklook draws them (the file keeps every detection; the
Layer Styling panel shows the rule to change). Stored in a GeoPackage's ``layer_styles`` table
(QGIS applies it on load) or written as a ``.qml`` sidecar beside other formats."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from xml.sax.saxutils import quoteattr

# matplotlib's tab10, as the quicklook draws classes
COLOURS = ["31,119,180", "255,127,14", "44,160,44", "214,39,40", "148,103,189", "140,86,75", "227,119,194",
           "127,127,127", "188,189,34", "23,190,207"]
LABEL_MAX_SCALE = 2500  # the score label shows from 1:2500 closer in


def qml(classes: list[str], min_score: float | None = None) -> str:
    """A QGIS style (QML) for detection polygons with a ``label`` and a ``score`` column: a
    categorized renderer by class, or with ``min_score`` a rule per class that draws only
    detections scoring at least ``min_score``."""
    cats, symbols, rules = [], [], []
    for i, name in enumerate(classes):
        cats.append(f'      <category value={quoteattr(str(name))} symbol="{i}" label={quoteattr(str(name))} render="true"/>')
        if min_score is not None:
            value = str(name).replace("'", "''")
            rule = f"\"label\" = '{value}' AND \"score\" >= {min_score:.4g}"
            rules.append(f'      <rule key="r{i}" symbol="{i}" filter={quoteattr(rule)} '
                         f'label={quoteattr(f"{name} (score >= {min_score:.2f})")}/>')
        symbols.append(f"""      <symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">
        <layer class="SimpleFill" enabled="1" pass="0" locked="0">
          <prop k="style" v="no"/>
          <prop k="color" v="{COLOURS[i % 10]},0"/>
          <prop k="outline_style" v="solid"/>
          <prop k="outline_color" v="{COLOURS[i % 10]},255"/>
          <prop k="outline_width" v="0.4"/>
          <prop k="outline_width_unit" v="MM"/>
          <data_defined_properties>
            <Option type="Map">
              <Option type="QString" name="name" value=""/>
              <Option type="Map" name="properties">
                <Option type="Map" name="outlineWidth">
                  <Option type="bool" name="active" value="true"/>
                  <Option type="QString" name="expression" value="0.2 + 0.6 * coalesce(&quot;score&quot;, 0)"/>
                  <Option type="int" name="type" value="3"/>
                </Option>
              </Option>
              <Option type="QString" name="type" value="collection"/>
            </Option>
          </data_defined_properties>
        </layer>
      </symbol>""")
    if min_score is None:
        renderer = f"""  <renderer-v2 type="categorizedSymbol" attr="label" symbollevels="0" enableorderby="0" forceraster="0">
    <categories>
{chr(10).join(cats)}
    </categories>
    <symbols>
{chr(10).join(symbols)}
    </symbols>
  </renderer-v2>"""
    else:
        renderer = f"""  <renderer-v2 type="RuleRenderer" symbollevels="0" enableorderby="0" forceraster="0">
    <rules key="root">
{chr(10).join(rules)}
    </rules>
    <symbols>
{chr(10).join(symbols)}
    </symbols>
  </renderer-v2>"""
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="Symbology|Labeling">
{renderer}
  <labeling type="simple">
    <settings calloutType="simple">
      <text-style fieldName="format_number(&quot;score&quot;, 2)" isExpression="1" fontSize="8" textColor="255,255,255,255"/>
      <text-buffer bufferDraw="1" bufferSize="0.7" bufferColor="0,0,0,255"/>
      <placement placement="1"/>
      <rendering scaleVisibility="1" scaleMin="0" scaleMax="{LABEL_MAX_SCALE}"/>
    </settings>
  </labeling>
</qgis>
"""


def add_gpkg_style(path: str | Path, layer: str, classes: list[str], min_score: float | None = None) -> None:
    """Store the default detection style for ``layer`` in the GeoPackage (``add_gpkg_style_qml``)."""
    add_gpkg_style_qml(path, layer, qml(classes, min_score), "geodet default: outlines by class")


def add_gpkg_style_qml(path: str | Path, layer: str, style: str, description: str) -> None:
    """Store the QML ``style`` for ``layer`` in the GeoPackage's ``layer_styles`` table, the way
    QGIS does (registered in ``gpkg_contents`` as an attributes table, ``f_geometry_column`` naming
    the layer's geometry column as ``gpkg_geometry_columns`` has it, ``update_time`` in ISO 8601),
    as the layer's default."""
    con = sqlite3.connect(str(path))
    try:
        row = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)).fetchone()
        geometry_column = row[0] if row else "geom"
        con.execute("""CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT,
            f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256), f_geometry_column TEXT(256),
            styleName TEXT(30), styleQML TEXT, styleSLD TEXT, useAsDefault BOOLEAN, description TEXT, owner TEXT(30),
            ui TEXT(30), update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))""")
        con.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, last_change) "
                    "VALUES ('layer_styles', 'attributes', 'layer_styles', strftime('%Y-%m-%dT%H:%M:%fZ','now'))")
        con.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName, "
                    "styleQML, styleSLD, useAsDefault, description, owner, update_time) VALUES ('', '', ?, ?, ?, ?, '', 1, "
                    "?, 'geodet', strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
                    (layer, geometry_column, f"{layer} (geodet)", style, description))
        con.commit()
    finally:
        con.close()


def suggestion_qml() -> str:
    """A QGIS style for suggested cells: thick magenta outlines, and the rank as a label."""
    return """<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="Symbology|Labeling">
  <renderer-v2 type="singleSymbol" symbollevels="0" enableorderby="0" forceraster="0">
    <symbols>
      <symbol type="fill" name="0" alpha="1" clip_to_extent="1" force_rhr="0">
        <layer class="SimpleFill" enabled="1" pass="0" locked="0">
          <prop k="style" v="no"/>
          <prop k="color" v="227,26,178,0"/>
          <prop k="outline_style" v="solid"/>
          <prop k="outline_color" v="227,26,178,255"/>
          <prop k="outline_width" v="0.8"/>
          <prop k="outline_width_unit" v="MM"/>
        </layer>
      </symbol>
    </symbols>
  </renderer-v2>
  <labeling type="simple">
    <settings calloutType="simple">
      <text-style fieldName="'#' || &quot;rank&quot;" isExpression="1" fontSize="11" textColor="255,255,255,255"/>
      <text-buffer bufferDraw="1" bufferSize="1" bufferColor="227,26,178,255"/>
      <placement placement="1"/>
    </settings>
  </labeling>
</qgis>
"""
