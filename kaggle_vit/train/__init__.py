"""The training layer: device and precision, augmentation, the torch dataset, batches, the one
training loop (`engine`) and the schedule planned from the data (`schedule`)."""
