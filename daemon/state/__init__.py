"""The daemon's own state: its folders, the journal, the ledger of committed offsets, the crash probe."""
