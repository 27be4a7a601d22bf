// The one way CPU loops get vector bodies: gcc emits a default, an AVX2+FMA (x86-64-v3) and an
// AVX-512 (x86-64-v4) body of a PFB_CPU_CLONES function and picks one at load time; the loops it
// calls are PFB_CPU_INLINE so that each body vectorises them at its own width. (Contraction into
// FMAs follows the file's flags: landscape.cpp is built with -ffp-contract=off, see CMakeLists.txt.)
#pragma once

#define PFB_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#define PFB_CPU_INLINE __attribute__((always_inline)) inline
