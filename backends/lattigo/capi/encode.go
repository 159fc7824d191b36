package main

/*
#include <stdlib.h>
*/
import "C"

import (
	"fmt"
	"math/big"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
)

// Encoding float64 slot values, as Lattigo v6.1.1's Encoder.Encode does it for a batched
// plaintext at float64 precision (embedDouble: inverse FFT, Complex128ToFixedPointCRT,
// NTTSparseAndMontgomery), with one difference: Lattigo's SingleFloat64ToFixedPointCRT makes
// three heap allocations per coefficient (the moduli chain, the Barrett constants and a
// big.Int), 196,608 for one plaintext at N=2^16, and fed the garbage collector of a server
// holding gigabytes of keys (benchmarks/measure_lattigo_costs.py --set n16-sparse: encode at
// level 0 took 8.8 ms with Lattigo's, 3.4 ms with this one).  Here the
// moduli and constants are read once per plaintext.  The result is the same polynomial, bit for
// bit (hl_debug_encode_matches, run by the tests, compares the two).

// slotEncoder is an encoder copy with its own complex buffer (one per concurrent hl_encode).
type slotEncoder struct {
	enc *ckks.Encoder
	buf []complex128
}

func (s *Session) newSlotEncoder() *slotEncoder {
	return &slotEncoder{enc: s.encoder.ShallowCopy(), buf: make([]complex128, s.p.slots())}
}

// encodeFast encodes vals (at most slots values, zero padded) on pt (batched, its level,
// scale and LogDimensions set; NTT and Montgomery flags as Lattigo's NewPlaintext sets them).
func (e *slotEncoder) encodeFast(params ckks.Parameters, vals []float64, pt *rlwe.Plaintext) error {
	md := pt.MetaData
	logSlots := md.LogDimensions.Cols
	slots := 1 << logSlots
	if params.RingType() != ring.Standard {
		return fmt.Errorf("fast encoding supports the standard ring only")
	}
	if len(vals) > slots || slots > len(e.buf) {
		return fmt.Errorf("%d values for %d slots", len(vals), slots)
	}
	buf := e.buf[:slots]
	for i, v := range vals {
		buf[i] = complex(v, 0)
	}
	for i := len(vals); i < slots; i++ {
		buf[i] = 0
	}
	if err := e.enc.IFFT(buf, logSlots); err != nil {
		return err
	}
	r := params.RingQ().AtLevel(pt.Level())
	moduli := r.ModuliChain()[:r.Level()+1]
	brc := r.BRedConstants()
	coeffs := pt.Value.Coeffs
	scale := md.Scale.Float64()
	tmp := new(big.Int)
	for i, v := range buf {
		fixedPointCRT(real(v), scale, moduli, brc, coeffs, i, tmp)
	}
	for i, v := range buf {
		fixedPointCRT(imag(v), scale, moduli, brc, coeffs, i+slots, tmp)
	}
	for j := range moduli {
		c := coeffs[j][2*slots:]
		for i := range c {
			c[i] = 0
		}
	}
	rlwe.NTTSparseAndMontgomery(r, md, pt.Value)
	return nil
}

// fixedPointCRT is SingleFloat64ToFixedPointCRT with the moduli, Barrett constants and scratch
// big.Int given: coefficient i of every prime gets round(value * scale) mod q.
func fixedPointCRT(value, scale float64, moduli []uint64, brc [][2]uint64, coeffs [][]uint64, i int, tmp *big.Int) {
	if value == 0 {
		for j := range moduli {
			coeffs[j][i] = 0
		}
		return
	}
	negative := value < 0
	if negative {
		scale = -scale
	}
	value *= scale
	if value >= 1.8446744073709552e+19 {
		xf := big.NewFloat(value)
		xf.Add(xf, big.NewFloat(0.5))
		xi := new(big.Int)
		xf.Int(xi)
		for j, q := range moduli {
			tmp.Mod(xi, new(big.Int).SetUint64(q))
			if negative {
				coeffs[j][i] = q - tmp.Uint64()
			} else {
				coeffs[j][i] = tmp.Uint64()
			}
		}
		return
	}
	c := uint64(value + 0.5)
	if negative {
		for j, q := range moduli {
			if c > q {
				coeffs[j][i] = q - ring.BRedAdd(c, q, brc[j])
			} else {
				coeffs[j][i] = q - c
			}
		}
		return
	}
	for j, q := range moduli {
		if c > 0x1fffffffffffffff {
			coeffs[j][i] = ring.BRedAdd(c, q, brc[j])
		} else {
			coeffs[j][i] = c
		}
	}
}

// hl_debug_encode_matches encodes vals at level and scale twice, with Lattigo's encoder and
// with encodeFast, and sets *same to 1 when the two plaintexts are equal coefficient for
// coefficient (the tests' check that the fast path is Lattigo's encoding).
//
//export hl_debug_encode_matches
func hl_debug_encode_matches(sh C.longlong, vals *C.double, n C.longlong, level C.int, scale C.double, same *C.int) *C.char {
	return sessionOp("encode check", sh, func(s *Session) error {
		v := float64s(vals, n)
		ref, err := s.encodeWith(nil, v, int(level), float64(scale))
		if err != nil {
			return err
		}
		fast, err := s.encodeWith(s.newSlotEncoder(), v, int(level), float64(scale))
		if err != nil {
			return err
		}
		*same = 0
		if ref.Value.Equal(&fast.Value) && ref.IsNTT == fast.IsNTT && ref.IsMontgomery == fast.IsMontgomery {
			*same = 1
		}
		return nil
	})
}
