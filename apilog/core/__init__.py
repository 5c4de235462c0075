"""What the app side and apilogd share: the entry, its wire and file formats, the log tree and safe folders.

apilogd imports apilog only through this package, `apilog.settings`, `apilog.exceptions`
and `apilog.spool`; everything else in `apilog` is the app's.
"""
