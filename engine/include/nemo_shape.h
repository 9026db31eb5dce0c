/* nemo_shape.h: (filled by its op family) */
