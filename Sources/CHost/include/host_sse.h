// SSE/SSE2 arithmetic for the software engine, done by the host CPU's own instructions:
// guest and host are both x86-64, so running the same instruction under the guest's MXCSR
// gives the guest bit-exact results, NaN propagation, integer indefinite and exception
// flags without re-deriving IEEE 754 and x86's conventions in software.
#ifndef HOST_SSE_H
#define HOST_SSE_H

#include <stdint.h>

/* `code`: (prefix << 8) | opcode byte of the 0F map, prefix 0 none, 1 66, 2 F3, 3 F2;
 * | 0x400 for REX.W (conversions to/from 64-bit integers).
 * `imm`: imm8, | ext << 8 for the shift-by-immediate groups (0F 71/72/73).
 * `dst`: the destination XMM register (16 bytes), updated in place.
 * `src`: the source operand (16 bytes: an XMM register, or memory / a GPR value zero-extended).
 * `mxcsr`: the guest's MXCSR (rounding, DAZ, FTZ); the exception flags raised are
 * returned in *raised (all exceptions are masked while the host runs the instruction).
 * `gpr`: receives a general-purpose result (MOVMSK*, PMOVMSKB, PEXTRW, CVT*2SI) or, for
 * (U)COMIS*, the RFLAGS bits ZF PF CF.
 * Returns 0, or -1 when the encoding is not an SSE/SSE2 instruction this helper runs. */
int host_sse_execute(uint32_t code, uint32_t imm, void *dst, const void *src, uint32_t mxcsr,
                     uint32_t *raised, uint64_t *gpr);

/* x87 arithmetic on 80-bit values (10 bytes each, little-endian), by the host's x87 with
 * the guest's control word (precision and rounding control; exceptions masked).
 * op: 0 add, 1 mul, 2 com (no result), 3 ucom (no result), 4 sub (a-b), 5 subr (b-a),
 * 6 div (a/b), 7 divr (b/a), 8 sqrt (a), 9 round to integer (FRNDINT, a),
 * 10 compare setting EFLAGS (FCOMI), 11 unordered compare setting EFLAGS (FUCOMI),
 * 12 F2XM1, 13 FSIN, 14 FCOS (a); 15 FYL2X, 16 FPATAN, 17 FYL2XP1 (a = st0, b = st1, result
 * replaces st1); 18 FPREM, 19 FPREM1, 20 FSCALE (result replaces st0); 21–27 FLD1 FLDL2T
 * FLDL2E FLDPI FLDLG2 FLDLN2 FLDZ; 28 FPTAN, 29 FSINCOS, 30 FXTRACT (result replaces st0,
 * result2 is pushed).
 * *result receives the 80-bit result; *status the x87 status word after the operation
 * (exception flags and C0–C3 condition codes; FCOMI: exception flags << 8 | ZF PF CF). */
void host_x87_execute(uint32_t op, const void *a, const void *b, void *result, void *result2, uint16_t fcw, uint16_t *status);

/* FIST/FISTP/FISTTP: converts an 80-bit value to a 16/32/64-bit integer under `fcw`
 * (truncate: FISTTP), returning the integer and the status word's exception flags. */
uint64_t host_x87_to_integer(const void *value, int size, int truncate, uint16_t fcw, uint16_t *status);

/* FST/FSTP m32/m64: converts an 80-bit value to single/double under `fcw`. */
uint64_t host_x87_to_float(const void *value, int size, uint16_t fcw, uint16_t *status);

/* FLD m32/m64 (size 4/8) and FILD m16/m32/m64 (integer != 0): to 80 bits. */
void host_x87_load(uint64_t bits, int size, int integer, void *result, uint16_t *status);

#endif
