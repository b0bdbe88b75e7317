"""mkdocs hook: serve MathJax with the site instead of from a CDN.

The `docs` extra installs MathJax 3 (the `django-static-mathjax` wheel, static files
only); its ES5 bundle and fonts are copied into the built site, so formulas render
offline and in a locally opened build.
"""

import pathlib
import shutil


def on_post_build(config, **kwargs):
    import mathjax  # from django-static-mathjax

    source = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    target = pathlib.Path(config["site_dir"]) / "_static" / "mathjax" / "es5"
    target.mkdir(parents=True, exist_ok=True)
    # The combined TeX bundle and the fonts its HTML output loads (relative to it).
    shutil.copy2(source / "tex-mml-chtml.js", target / "tex-mml-chtml.js")
    fonts = pathlib.Path("output") / "chtml" / "fonts" / "woff-v2"
    shutil.copytree(source / fonts, target / fonts, dirs_exist_ok=True)
