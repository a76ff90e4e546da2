"""The data layer, without torch: a competition's files read, checked and cached (`kaggle-vit data`
starts fast). Modules, lowest first: cache, tables, images, layouts, folds, fetch."""
