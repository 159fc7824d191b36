package main

/*
#include <stdlib.h>
*/
import "C"

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"time"

	"github.com/tuneinsight/lattigo/v6/circuits/ckks/bootstrapping"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
)

// Key files: an 80-byte header, then Lattigo's own WriteTo encoding.
//
//	magic "HECLTG01" | kind (8 bytes, NUL padded) | params fingerprint (32) | key-set id (32)
//
// The key-set id is random per keygen; the server refuses to mix files of two
// key sets or of another parameter set.
const fileMagic = "HECLTG01"
const headerSize = 8 + 8 + 32 + 32

const (
	kindSecret    = "secret"
	kindPublic    = "public"
	kindRelin     = "relin"
	kindGalois    = "galois"
	kindBootstrap = "btp"
	kindCipher    = "ct"
)

// Session is a loaded key set: a client (secret + public key) or a server
// (public + evaluation keys, never the secret key).
type Session struct {
	mu       sync.Mutex // guards the evaluator, encoder and encryptors (their buffers)
	p        *Params
	keysetID [32]byte
	client   bool

	sk      *rlwe.SecretKey
	pk      *rlwe.PublicKey
	encoder *ckks.Encoder
	// encoders are copies of encoder (own buffers) for hl_encode, which runs without mu: a
	// thread encoding the next plaintexts overlaps the evaluator's work on another core
	encoders chan *slotEncoder
	fast     *slotEncoder // encodeFast's buffers for calls under mu
	encPk    *rlwe.Encryptor
	encSk    *rlwe.Encryptor
	dec      *rlwe.Decryptor

	evk      *rlwe.MemEvaluationKeySet
	eval     *ckks.Evaluator
	steps    []int // normalised rotation steps with a Galois key
	levels   []int // the level each of those keys is made for (its LevelQ)
	hasRelin bool

	btpKeys *bootstrapping.EvaluationKeys
	btpMu   sync.Mutex // guards btpEval / btpPool creation and btpEval use
	btpEval *bootstrapping.Evaluator
	btpPool []*bootstrapping.Evaluator
}

// fullReader makes every Read a ReadFull: Lattigo's metadata ReadFrom does a
// single Read and would misparse a short read at a bufio buffer boundary.
type fullReader struct{ *bufio.Reader }

func (r fullReader) Read(p []byte) (int, error) { return io.ReadFull(r.Reader, p) }

func header(kind string, p *Params, id [32]byte) []byte {
	h := make([]byte, headerSize)
	copy(h[0:8], fileMagic)
	copy(h[8:16], kind)
	copy(h[16:48], p.fingerprint[:])
	copy(h[48:80], id[:])
	return h
}

func checkHeader(h []byte, kind string, p *Params, path string) ([32]byte, error) {
	var id [32]byte
	if string(h[0:8]) != fileMagic {
		return id, fmt.Errorf("%s: not a hecompiler Lattigo file (bad magic)", path)
	}
	k := string(h[8:16])
	for len(k) > 0 && k[len(k)-1] == 0 {
		k = k[:len(k)-1]
	}
	if k != kind {
		return id, fmt.Errorf("%s: holds a %q object, expected %q", path, k, kind)
	}
	if string(h[16:48]) != string(p.fingerprint[:]) {
		return id, fmt.Errorf("%s: was made for another parameter set (fingerprint mismatch)", path)
	}
	copy(id[:], h[48:80])
	return id, nil
}

// writeAtomic writes path through a temp file in the same directory and a
// rename, so a failure never leaves a half-written file.
func writeAtomic(path string, mode os.FileMode, write func(w *bufio.Writer) error) (int64, error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return 0, err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(mode); err != nil {
		return 0, err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	if err := write(w); err != nil {
		return 0, err
	}
	if err := w.Flush(); err != nil {
		return 0, err
	}
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if err := f.Close(); err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return 0, err
	}
	ok = true
	return st.Size(), nil
}

type keyFile struct {
	f  *os.File
	r  fullReader
	id [32]byte
}

func openKeyFile(path, kind string, p *Params) (*keyFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	r := fullReader{bufio.NewReaderSize(f, 1<<20)}
	h := make([]byte, headerSize)
	if _, err := io.ReadFull(r, h); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: truncated header: %w", path, err)
	}
	id, err := checkHeader(h, kind, p, path)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &keyFile{f: f, r: r, id: id}, nil
}

func (k *keyFile) close() { k.f.Close() }

func writeU32(w io.Writer, v uint32) error { return binary.Write(w, binary.LittleEndian, v) }
func readU32(r io.Reader) (uint32, error) {
	var v uint32
	err := binary.Read(r, binary.LittleEndian, &v)
	return v, err
}
func writeU64(w io.Writer, v uint64) error { return binary.Write(w, binary.LittleEndian, v) }
func readU64(r io.Reader) (uint64, error) {
	var v uint64
	err := binary.Read(r, binary.LittleEndian, &v)
	return v, err
}

// normSteps maps rotation steps to [1, slots) (k and k+slots rotate alike),
// drops 0, sorts and de-duplicates.
func normSteps(steps []int64, slots int) []int {
	set := map[int]bool{}
	for _, k := range steps {
		r := int(((k % int64(slots)) + int64(slots)) % int64(slots))
		if r != 0 {
			set[r] = true
		}
	}
	out := make([]int, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Ints(out)
	return out
}

type keygenReport struct {
	Seconds    map[string]float64 `json:"seconds"`
	Bytes      map[string]int64   `json:"bytes"`
	Steps      []int              `json:"steps"`
	Levels     []int              `json:"levels"` // the level each step's key is made for
	Elements   []uint64           `json:"galois_elements"`
	BtpGaloisN int                `json:"bootstrap_galois_keys"`
	// of those, keys made at SlotsToCoeffs' level (used nowhere above it), and that level
	BtpLowN     int    `json:"bootstrap_low_keys"`
	BtpLowLevel int    `json:"bootstrap_low_level"`
	PeakHeapSys uint64 `json:"go_heap_sys"`
}

// keyLevels: each normalised step's key level, the highest of the levels given for it (levels
// may be nil or shorter than steps: the top level for the rest; a level outside 0..top: the top).
func keyLevels(steps []int64, levels []int64, slots, top int) map[int]int {
	at := map[int]int{}
	for i, k := range steps {
		r := int(((k % int64(slots)) + int64(slots)) % int64(slots))
		if r == 0 {
			continue
		}
		lv := top
		if i < len(levels) && levels[i] >= 0 && levels[i] < int64(top) {
			lv = int(levels[i])
		}
		if old, ok := at[r]; !ok || lv > old {
			at[r] = lv
		}
	}
	return at
}

func keygen(p *Params, clientDir, serverDir string, steps []int64, levels []int64, relin bool,
	btp bool) (*keygenReport, error) {
	if btp && p.btp == nil {
		return nil, fmt.Errorf("bootstrap keys requested but the parameter set has no bootstrap literal")
	}
	if err := os.MkdirAll(clientDir, 0o700); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(serverDir, 0o755); err != nil {
		return nil, err
	}
	if filepath.Clean(clientDir) == filepath.Clean(serverDir) {
		return nil, fmt.Errorf("client and server key directories must differ (the server must not get secret.key)")
	}
	rep := &keygenReport{Seconds: map[string]float64{}, Bytes: map[string]int64{}}
	var id [32]byte
	if _, err := rand.Read(id[:]); err != nil {
		return nil, err
	}
	t0 := time.Now()
	kg := rlwe.NewKeyGenerator(p.ckks)
	sk, pk := kg.GenKeyPairNew()
	rep.Seconds["secret_public"] = time.Since(t0).Seconds()

	put := func(name, dir, kind string, mode os.FileMode, obj io.WriterTo) error {
		n, err := writeAtomic(filepath.Join(dir, name), mode, func(w *bufio.Writer) error {
			if _, err := w.Write(header(kind, p, id)); err != nil {
				return err
			}
			_, err := obj.WriteTo(w)
			return err
		})
		if err != nil {
			return fmt.Errorf("writing %s: %w", filepath.Join(dir, name), err)
		}
		rep.Bytes[kind] = n
		return nil
	}
	if err := put("secret.key", clientDir, kindSecret, 0o600, sk); err != nil {
		return nil, err
	}
	for _, dir := range []string{clientDir, serverDir} {
		if err := put("public.key", dir, kindPublic, 0o644, pk); err != nil {
			return nil, err
		}
	}
	if relin {
		t := time.Now()
		rlk := kg.GenRelinearizationKeyNew(sk)
		if err := put("relin.key", serverDir, kindRelin, 0o644, rlk); err != nil {
			return nil, err
		}
		rep.Seconds["relin"] = time.Since(t).Seconds()
	}

	ns := normSteps(steps, p.slots())
	top := p.ckks.MaxLevelQ()
	at := keyLevels(steps, levels, p.slots(), top)
	rep.Steps = ns
	t := time.Now()
	n, err := writeAtomic(filepath.Join(serverDir, "galois.key"), 0o644, func(w *bufio.Writer) error {
		if _, err := w.Write(header(kindGalois, p, id)); err != nil {
			return err
		}
		if err := writeU32(w, uint32(len(ns))); err != nil {
			return err
		}
		// one key buffer per level, reused: one key in memory at a time; a key made for a lower
		// level has fewer primes (smaller, quicker) and serves every ciphertext at or below it
		bufs := map[int]*rlwe.GaloisKey{}
		for _, k := range ns {
			el := p.ckks.GaloisElement(k)
			rep.Elements = append(rep.Elements, el)
			lv := at[k]
			rep.Levels = append(rep.Levels, lv)
			gk := bufs[lv]
			if gk == nil {
				gk = rlwe.NewGaloisKey(p.ckks, rlwe.EvaluationKeyParameters{LevelQ: &lv})
				bufs[lv] = gk
			}
			kg.GenGaloisKey(el, sk, gk)
			if err := writeU64(w, uint64(k)); err != nil {
				return err
			}
			if err := writeU64(w, el); err != nil {
				return err
			}
			if _, err := gk.WriteTo(w); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("writing galois.key: %w", err)
	}
	rep.Bytes[kindGalois] = n
	rep.Seconds["galois"] = time.Since(t).Seconds()

	if btp {
		t := time.Now()
		n, cnt, low, err := writeBootstrapKeys(p, sk, id, filepath.Join(serverDir, "bootstrap.key"))
		if err != nil {
			return nil, fmt.Errorf("writing bootstrap.key: %w", err)
		}
		rep.Bytes[kindBootstrap] = n
		rep.BtpGaloisN = cnt
		rep.BtpLowN, rep.BtpLowLevel = len(low.only), low.levelQ
		rep.Seconds["bootstrap"] = time.Since(t).Seconds()
	}
	// a key kind not generated this time must not survive from an older key set
	if !relin {
		os.Remove(filepath.Join(serverDir, "relin.key"))
	}
	if !btp {
		os.Remove(filepath.Join(serverDir, "bootstrap.key"))
	}
	rep.Seconds["total"] = time.Since(t0).Seconds()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	rep.PeakHeapSys = m.HeapSys
	return rep, nil
}

// writeBootstrapKeys streams the bootstrapping evaluation keys of Lattigo's
// bootstrapping.Parameters.GenEvaluationKeys (same-ring case: the secret is
// extended to the bootstrapping modulus), generating one Galois key at a time
// instead of all of them at once.  Layout after the header:
//
//	u8 has_dense_to_sparse [EvaluationKey] | u8 has_sparse_to_dense [EvaluationKey] |
//	RelinearizationKey | u32 count | count x (u64 galois element, GaloisKey)
func writeBootstrapKeys(p *Params, skN1 *rlwe.SecretKey, id [32]byte, path string) (int64, int, lowKeys, error) {
	bp := p.btp
	paramsN2 := bp.BootstrappingParameters
	if paramsN2.N() != p.ckks.N() {
		return 0, 0, lowKeys{levelQ: -1}, fmt.Errorf("bootstrapping ring degree differs from the residual one: not supported")
	}
	kgen := rlwe.NewKeyGenerator(paramsN2)
	ringQ, ringP := paramsN2.RingQ(), paramsN2.RingP()
	skN2 := rlwe.NewSecretKey(paramsN2)
	buff := ringQ.NewPoly()
	rlwe.ExtendBasisSmallNormAndCenterNTTMontgomery(ringQ, ringQ, skN1.Value.Q, buff, skN2.Value.Q)
	rlwe.ExtendBasisSmallNormAndCenterNTTMontgomery(ringQ, ringP, skN1.Value.Q, buff, skN2.Value.P)

	els := append(bp.GaloisElements(paramsN2), paramsN2.GaloisElementForComplexConjugation())
	seen := map[uint64]bool{}
	uniq := els[:0]
	for _, e := range els {
		if !seen[e] {
			seen[e] = true
			uniq = append(uniq, e)
		}
	}
	els = uniq
	low := lowBootstrapKeys(bp, paramsN2)

	n, err := writeAtomic(path, 0o644, func(w *bufio.Writer) error {
		if _, err := w.Write(header(kindBootstrap, p, id)); err != nil {
			return err
		}
		var d2s, s2d *rlwe.EvaluationKey
		if bp.EphemeralSecretWeight != 0 {
			paramsSparse, err := rlwe.NewParametersFromLiteral(rlwe.ParametersLiteral{
				LogN: paramsN2.LogN(), Q: paramsN2.Q()[:1], P: paramsN2.P()[:1],
			})
			if err != nil {
				return err
			}
			kgenSparse := rlwe.NewKeyGenerator(paramsSparse)
			skSparse := kgenSparse.GenSecretKeyWithHammingWeightNew(bp.EphemeralSecretWeight)
			d2s = kgenSparse.GenEvaluationKeyNew(skN2, skSparse)
			s2d = kgen.GenEvaluationKeyNew(skSparse, skN2)
		}
		for _, k := range []*rlwe.EvaluationKey{d2s, s2d} {
			has := byte(0)
			if k != nil {
				has = 1
			}
			if err := w.WriteByte(has); err != nil {
				return err
			}
			if k != nil {
				if _, err := k.WriteTo(w); err != nil {
					return err
				}
			}
		}
		d2s, s2d = nil, nil
		rlk := kgen.GenRelinearizationKeyNew(skN2)
		if _, err := rlk.WriteTo(w); err != nil {
			return err
		}
		rlk = nil
		if err := writeU32(w, uint32(len(els))); err != nil {
			return err
		}
		gk := rlwe.NewGaloisKey(paramsN2)
		var gkLow *rlwe.GaloisKey
		if low.levelQ >= 0 {
			gkLow = rlwe.NewGaloisKey(paramsN2, rlwe.EvaluationKeyParameters{LevelQ: &low.levelQ})
		}
		for _, el := range els {
			key := gk // reuse one key buffer per level
			if low.only[el] {
				key = gkLow
			}
			kgen.GenGaloisKey(el, skN2, key)
			if err := writeU64(w, el); err != nil {
				return err
			}
			if _, err := key.WriteTo(w); err != nil {
				return err
			}
		}
		return nil
	})
	return n, len(els), low, err
}

// lowKeys: the bootstrapping Galois elements used only by SlotsToCoeffs, and the level it
// starts at (-1: none).
type lowKeys struct {
	levelQ int
	only   map[uint64]bool
}

// lowBootstrapKeys finds the Galois elements a bootstrap uses only in SlotsToCoeffs, which
// runs at the bottom of the bootstrapping chain (ModUp, CoeffsToSlots, EvalMod, then
// SlotsToCoeffs from its LevelQ down to the residual top).  Their keys need no primes above
// that level: a key-switching key of fewer primes is smaller in size and in digits
// (ceil((levelQ+1)/#P) instead of ceil(#Q/#P) parts), and Lattigo's gadget product works at
// min(ciphertext level, key level), so a key must reach every level it is used at: only
// circuits in this order (ModUpThenEncode, Lattigo's default) qualify, and elements that
// CoeffsToSlots, the SubSum of a sparse packing or the conjugation also use keep full keys.
func lowBootstrapKeys(bp *bootstrapping.Parameters, paramsN2 ckks.Parameters) lowKeys {
	none := lowKeys{levelQ: -1}
	if bp.CircuitOrder != bootstrapping.ModUpThenEncode {
		return none
	}
	levelQ := bp.SlotsToCoeffsParameters.LevelQ
	if levelQ < 0 || levelQ >= paramsN2.MaxLevelQ() || levelQ >= bp.Mod1ParametersLiteral.LevelQ {
		return none
	}
	high := map[uint64]bool{paramsN2.GaloisElementForComplexConjugation(): true}
	for _, e := range bp.CoeffsToSlotsParameters.GaloisElements(paramsN2) {
		high[e] = true
	}
	for i := bp.LogMaxDimensions().Cols; i < paramsN2.LogN()-1; i++ { // SubSum, after ModUp
		high[paramsN2.GaloisElement(1<<i)] = true
	}
	only := map[uint64]bool{}
	for _, e := range bp.SlotsToCoeffsParameters.GaloisElements(paramsN2) {
		if !high[e] {
			only[e] = true
		}
	}
	if len(only) == 0 {
		return none
	}
	return lowKeys{levelQ: levelQ, only: only}
}

func readBootstrapKeys(p *Params, path string) (*bootstrapping.EvaluationKeys, [32]byte, error) {
	kf, err := openKeyFile(path, kindBootstrap, p)
	if err != nil {
		return nil, [32]byte{}, err
	}
	defer kf.close()
	r := kf.r
	keys := &bootstrapping.EvaluationKeys{}
	for i := 0; i < 2; i++ {
		has, err := r.ReadByte()
		if err != nil {
			return nil, kf.id, fmt.Errorf("%s: truncated: %w", path, err)
		}
		if has == 1 {
			k := new(rlwe.EvaluationKey)
			if _, err := k.ReadFrom(r); err != nil {
				return nil, kf.id, fmt.Errorf("%s: %w", path, err)
			}
			if i == 0 {
				keys.EvkDenseToSparse = k
			} else {
				keys.EvkSparseToDense = k
			}
		}
	}
	rlk := new(rlwe.RelinearizationKey)
	if _, err := rlk.ReadFrom(r); err != nil {
		return nil, kf.id, fmt.Errorf("%s: relinearization key: %w", path, err)
	}
	cnt, err := readU32(r)
	if err != nil {
		return nil, kf.id, fmt.Errorf("%s: truncated: %w", path, err)
	}
	gks := make([]*rlwe.GaloisKey, 0, cnt)
	for i := uint32(0); i < cnt; i++ {
		el, err := readU64(r)
		if err != nil {
			return nil, kf.id, fmt.Errorf("%s: truncated: %w", path, err)
		}
		gk := new(rlwe.GaloisKey)
		if _, err := gk.ReadFrom(r); err != nil {
			return nil, kf.id, fmt.Errorf("%s: Galois key %d: %w", path, i, err)
		}
		if gk.GaloisElement != el {
			return nil, kf.id, fmt.Errorf("%s: Galois key %d: element %d != recorded %d", path, i, gk.GaloisElement, el)
		}
		gks = append(gks, gk)
	}
	keys.MemEvaluationKeySet = rlwe.NewMemEvaluationKeySet(rlk, gks...)
	return keys, kf.id, nil
}

func readObj(path, kind string, p *Params, obj io.ReaderFrom) ([32]byte, error) {
	kf, err := openKeyFile(path, kind, p)
	if err != nil {
		return [32]byte{}, err
	}
	defer kf.close()
	if _, err := obj.ReadFrom(kf.r); err != nil {
		return kf.id, fmt.Errorf("%s: %w", path, err)
	}
	return kf.id, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func loadClient(p *Params, dir string) (*Session, error) {
	s := &Session{p: p, client: true}
	sk, pk := new(rlwe.SecretKey), new(rlwe.PublicKey)
	idS, err := readObj(filepath.Join(dir, "secret.key"), kindSecret, p, sk)
	if err != nil {
		return nil, err
	}
	idP, err := readObj(filepath.Join(dir, "public.key"), kindPublic, p, pk)
	if err != nil {
		return nil, err
	}
	if idS != idP {
		return nil, fmt.Errorf("%s: secret.key and public.key belong to different key sets", dir)
	}
	s.keysetID, s.sk, s.pk = idS, sk, pk
	s.setEncoder(ckks.NewEncoder(p.ckks))
	s.encSk = rlwe.NewEncryptor(p.ckks, sk)
	s.encPk = rlwe.NewEncryptor(p.ckks, pk)
	s.dec = rlwe.NewDecryptor(p.ckks, sk)
	s.eval = ckks.NewEvaluator(p.ckks, nil)
	return s, nil
}

func loadServer(p *Params, dir string) (*Session, error) {
	s := &Session{p: p}
	pk := new(rlwe.PublicKey)
	id, err := readObj(filepath.Join(dir, "public.key"), kindPublic, p, pk)
	if err != nil {
		return nil, err
	}
	s.keysetID, s.pk = id, pk
	same := func(other [32]byte, name string) error {
		if other != id {
			return fmt.Errorf("%s: %s belongs to another key set than public.key", dir, name)
		}
		return nil
	}
	var rlk *rlwe.RelinearizationKey
	if path := filepath.Join(dir, "relin.key"); exists(path) {
		rlk = new(rlwe.RelinearizationKey)
		idR, err := readObj(path, kindRelin, p, rlk)
		if err != nil {
			return nil, err
		}
		if err := same(idR, "relin.key"); err != nil {
			return nil, err
		}
		s.hasRelin = true
	}
	var gks []*rlwe.GaloisKey
	if path := filepath.Join(dir, "galois.key"); exists(path) {
		kf, err := openKeyFile(path, kindGalois, p)
		if err != nil {
			return nil, err
		}
		defer kf.close()
		if err := same(kf.id, "galois.key"); err != nil {
			return nil, err
		}
		cnt, err := readU32(kf.r)
		if err != nil {
			return nil, fmt.Errorf("%s: truncated: %w", path, err)
		}
		for i := uint32(0); i < cnt; i++ {
			k, err1 := readU64(kf.r)
			el, err2 := readU64(kf.r)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("%s: truncated at key %d", path, i)
			}
			gk := new(rlwe.GaloisKey)
			if _, err := gk.ReadFrom(kf.r); err != nil {
				return nil, fmt.Errorf("%s: key %d: %w", path, i, err)
			}
			if gk.GaloisElement != el || p.ckks.GaloisElement(int(k)) != el {
				return nil, fmt.Errorf("%s: key %d: Galois element mismatch (step %d)", path, i, k)
			}
			gks = append(gks, gk)
			s.steps = append(s.steps, int(k))
			s.levels = append(s.levels, gk.LevelQ())
		}
	}
	if path := filepath.Join(dir, "bootstrap.key"); exists(path) {
		if p.btp == nil {
			return nil, fmt.Errorf("%s: bootstrap keys present but the parameter set has no bootstrap literal", dir)
		}
		keys, idB, err := readBootstrapKeys(p, path)
		if err != nil {
			return nil, err
		}
		if err := same(idB, "bootstrap.key"); err != nil {
			return nil, err
		}
		s.btpKeys = keys
	}
	s.evk = rlwe.NewMemEvaluationKeySet(rlk, gks...)
	s.eval = ckks.NewEvaluator(p.ckks, s.evk)
	s.setEncoder(ckks.NewEncoder(p.ckks))
	s.encPk = rlwe.NewEncryptor(p.ckks, pk)
	return s, nil
}

//export hl_keygen
func hl_keygen(ph C.longlong, clientDir, serverDir *C.char, steps *C.longlong, levels *C.longlong,
	nsteps C.longlong, relin C.int, btp C.int, out **C.char) *C.char {
	return guard("keygen", func() error {
		p, err := lookup[*Params](ph, "parameter set")
		if err != nil {
			return err
		}
		doBtp := p.btp != nil
		if btp >= 0 {
			doBtp = btp != 0
		}
		rep, err := keygen(p, C.GoString(clientDir), C.GoString(serverDir),
			append([]int64(nil), int64s(steps, nsteps)...), append([]int64(nil), int64s(levels, nsteps)...),
			relin != 0, doBtp)
		if err != nil {
			return err
		}
		return cJSON(rep, out)
	})
}

//export hl_load_client
func hl_load_client(ph C.longlong, dir *C.char, out *C.longlong) *C.char {
	return guard("load client keys", func() error {
		p, err := lookup[*Params](ph, "parameter set")
		if err != nil {
			return err
		}
		s, err := loadClient(p, C.GoString(dir))
		if err != nil {
			return err
		}
		*out = C.longlong(put(s))
		return nil
	})
}

//export hl_load_server
func hl_load_server(ph C.longlong, dir *C.char, out *C.longlong) *C.char {
	return guard("load server keys", func() error {
		p, err := lookup[*Params](ph, "parameter set")
		if err != nil {
			return err
		}
		s, err := loadServer(p, C.GoString(dir))
		if err != nil {
			return err
		}
		*out = C.longlong(put(s))
		return nil
	})
}

//export hl_session_info
func hl_session_info(sh C.longlong, out **C.char) *C.char {
	return guard("session_info", func() error {
		s, err := lookup[*Session](sh, "key session")
		if err != nil {
			return err
		}
		return cJSON(map[string]any{
			"client": s.client, "steps": s.steps, "levels": s.levels, "relin": s.hasRelin,
			"bootstrap": s.btpKeys != nil, "secret_key": s.sk != nil,
		}, out)
	})
}
