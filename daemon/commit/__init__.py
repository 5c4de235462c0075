"""The exactly-once path into the files: batches routed, journaled, appended and sealed; the limits; the forward role."""
