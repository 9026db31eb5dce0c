/*
 * nemo_ops.h: the op families' declarations, included by nemo.h (and so seen by ffi.cdef).
 * One header per family; each family owns its header, its engine/ops/<family>.c front-end,
 * its kernels/cpu/<family>.c kernels, its lua/nemo/ops/<family>.lua bindings and its tests.
 */
#ifndef NEMO_OPS_H
#define NEMO_OPS_H
#include "nemo_reduce.h"
#include "nemo_linalg.h"
#include "nemo_nnops.h"
#include "nemo_shape.h"
#include "nemo_conv.h"
#include "nemo_fused.h"
#include "nemo_safetensors.h"
#include "nemo_coll.h"
#endif
