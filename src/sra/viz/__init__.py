"""Figures: EMA sample grids (:mod:`~sra.viz.grid`), loss curves (:mod:`~sra.viz.curves`), image
loading (:mod:`~sra.viz.images`), and the feature-PCA figure: maps (:mod:`~sra.viz.pca`),
drawing (:mod:`~sra.viz.pca_figure`), inputs (:mod:`~sra.viz.pca_inputs`), and ``sra pca``
end to end (:mod:`~sra.viz.pca_run`)."""
