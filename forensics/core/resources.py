"""Files the package ships beside its code (the demo lab, model configs, calibration, the v2 catalogue).

Every such path comes from :func:`package_path`, which asks ``importlib.resources`` where the installed
``forensics`` package lies, so a source checkout and ``pip install .`` read the same files from inside the
package.
"""

from __future__ import annotations

import atexit
import functools
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path

_EXTRACTED = ExitStack()  # resources that only existed inside an archive, extracted once, deleted at exit
atexit.register(_EXTRACTED.close)


@functools.cache
def package_path(*parts: str) -> Path:
    """The real filesystem path of ``forensics/<parts...>`` (a file or a folder, which may not exist yet).

    The package is installed as regular files, so this is the file itself and nothing is copied. Were it imported
    from an archive, ``as_file`` would extract the resource to a temporary place kept until the process exits
    (folders need Python 3.12+ for that).
    """
    resource = files("forensics").joinpath(*parts)
    if isinstance(resource, Path):
        return resource.resolve()
    return _EXTRACTED.enter_context(as_file(resource))
