"""A Python model of the index arithmetic of the CUDA kernels in csrc/ (a development aid, not a test of the
compiled code).

Each kernel's tile loops, operand loaders (8-element chunks with bounds masks), reduction ranges (split-K,
q/k/v straddling), epilogues, the dh/dB kernel and the Philox mask are transliterated line by line from
lora_common.cuh / lora_fwd.cu / lora_bwd.cu and run on small ragged shapes against the float64 math. It catches
indexing mistakes when the tiling changes, on a machine without a GPU; it cannot catch CUDA-specific errors
(wmma fragment use, barriers, alignment). Keep it in step with the kernels. Run: python csrc/tools/index_model.py
"""
import numpy as np
BM=BN=64; BK=32; NT=128
def cdiv(a,b): return (a+b-1)//b
def load8(row, i0, lo, hi):  # row: callable idx->value or array with base offset semantic
    return np.array([row(i0+i) if lo <= i0+i < hi else 0.0 for i in range(8)], dtype=np.float32)

def philox(c0,c1,k0,k1):
    M0,M1=0xD2511F53,0xCD9E8D57; c2=c3=0
    for _ in range(10):
        p0=M0*c0; p1=M1*c2
        hi0,lo0=(p0>>32)&0xFFFFFFFF,p0&0xFFFFFFFF; hi1,lo1=(p1>>32)&0xFFFFFFFF,p1&0xFFFFFFFF
        c0,c1,c2,c3 = hi1^c1^k0, lo1, hi0^c3^k1, lo0
        k0=(k0+0x9E3779B9)&0xFFFFFFFF; k1=(k1+0xBB67AE85)&0xFFFFFFFF
    return [c0,c1,c2,c3]
class Drop:
    def __init__(s, seed, p): s.on=p>0; s.seed=seed; s.thr=min(round(p*65536),65535); s.inv=1/(1-p) if p>0 else 1.0
def keep8(d,row,grp):
    if not d.on: return 0xFF
    w=philox(grp,row,d.seed&0xFFFFFFFF,(d.seed>>32)&0xFFFFFFFF); bits=0
    for i in range(8):
        u=(w[i>>1]>>((i&1)*16))&0xFFFF
        bits |= (1 if u>=d.thr else 0)<<i
    return bits
def apply_keep(v,bits):
    return np.array([v[i] if (bits>>i)&1 else 0.0 for i in range(8)],dtype=np.float32)

def gemm(P, grid):
    for bx in range(grid[0]):
      for by in range(grid[1]):
        for bz in range(grid[2]):
          m0,n0=bx*BM,by*BN
          acc1=np.zeros((BM,BN),np.float32); acc2=np.zeros((BM,BN),np.float32)
          def run(lo,hi,fa,fb,AK,BKc,acc):
            # physical shared-memory layouts and wmma fragment semantics, as in lora_common.cuh
            LdA,LdAT,LdB,LdBT=BK+8,BM+8,BN+8,BK+8
            AE=max(BM*LdA,BK*LdAT); BE=max(BK*LdB,BN*LdBT)
            k0=lo
            while k0<hi:
              As=np.full(AE,np.nan,np.float32); Bs=np.full(BE,np.nan,np.float32)
              for it in range(2):
                for tid in range(NT):
                  c=tid+it*NT
                  if AK:
                    v=fa(m0+c//(BK//8),k0+(c%(BK//8))*8); o=(c//(BK//8))*LdA+(c%(BK//8))*8
                  else:
                    v=fa(k0+c//(BM//8),m0+(c%(BM//8))*8); o=(c//(BM//8))*LdAT+(c%(BM//8))*8
                  assert o%8==0; As[o:o+8]=v
                  if BKc:
                    v=fb(n0+c//(BK//8),k0+(c%(BK//8))*8); o=(c//(BK//8))*LdBT+(c%(BK//8))*8
                  else:
                    v=fb(k0+c//(BN//8),n0+(c%(BN//8))*8); o=(c//(BN//8))*LdB+(c%(BN//8))*8
                  assert o%8==0; Bs[o:o+8]=v
              # fragment loads: matrix_a row_major (m,k)->As[m*ld+k], col_major (m,k)->As[k*ld+m];
              # matrix_b row_major (k,n)->Bs[k*ld+n], col_major (k,n)->Bs[n*ld+k]
              At=np.array([[As[m*LdA+k] if AK else As[k*LdAT+m] for k in range(BK)] for m in range(BM)])
              Bt=np.array([[Bs[n*LdBT+k] if BKc else Bs[k*LdB+n] for n in range(BN)] for k in range(BK)])
              assert not np.isnan(At).any() and not np.isnan(Bt).any()
              acc += At@Bt
              k0+=BK
          lo,hi=P.range1(bz); run(lo,hi,P.a1,P.b1,P.A1K,P.B1K,acc1)
          if P.HAS2:
            lo,hi=P.range2(n0); run(lo,hi,P.a2,P.b2,P.A2K,P.B2K,acc2)
          for c in range(BM*(BN//8)):
            row=c//(BN//8); nc=(c%(BN//8))*8
            P.epilogue(m0+row,n0+nc,acc1[row,nc:nc+8],acc2[row,nc:nc+8])

class Slices:
    def __init__(s, flat):
        s.ntgt=len(flat)//2; s.off=flat[0::2]; s.cnt=flat[1::2]; s.boff=list(np.cumsum([0]+list(s.cnt))[:-1])

class Down:
    A1K=B1K=True; HAS2=False
    def __init__(s,x,A,h,d): s.x,s.A,s.h,s.d=x,A,h,d; s.M,s.K=x.shape; s.R=A.shape[0]
    def a1(s,m,k0):
        if m>=s.M: return np.zeros(8,np.float32)
        v=load8(lambda i: s.x[m,i],k0,0,s.K); return apply_keep(v,keep8(s.d,m,k0>>3))
    def b1(s,j,k0):
        if j>=s.R: return np.zeros(8,np.float32)
        return load8(lambda i: s.A[j,i],k0,0,s.K)
    def range1(s,z): return 0,s.K
    def epilogue(s,m,n0,c1,c2):
        if m>=s.M: return
        sc=s.d.inv if s.d.on else 1.0
        for i in range(8):
            if n0+i<s.R: s.h[m,n0+i]=c1[i]*sc

class Main:
    A1K=B1K=A2K=B2K=True; HAS2=True
    def __init__(s,x,W,b,h,B,y,r,sl,sc): s.x,s.W,s.b,s.h,s.B,s.y,s.r,s.sl,s.s=x,W,b,h,B,y,r,sl,sc; s.M,s.K=x.shape; s.N=W.shape[0]; s.R=sl.ntgt*r
    def a1(s,m,k0):
        if m>=s.M: return np.zeros(8,np.float32)
        return load8(lambda i: s.x[m,i],k0,0,s.K)
    def b1(s,n,k0):
        if n>=s.N: return np.zeros(8,np.float32)
        return load8(lambda i: s.W[n,i],k0,0,s.K)
    def a2(s,m,j0):
        if m>=s.M: return np.zeros(8,np.float32)
        return load8(lambda i: s.h[m,i],j0,0,s.R)
    def b2(s,n,j0):
        sl=s.sl; r=s.r
        if n<s.N:
            for t in range(3):
                if t<sl.ntgt and sl.off[t]<=n<sl.off[t]+sl.cnt[t]:
                    brow=sl.boff[t]+n-sl.off[t]
                    return load8(lambda i: s.B[brow, i-t*r], j0, t*r, t*r+r)
        return np.zeros(8,np.float32)
    def range1(s,z): return 0,s.K
    def range2(s,n0):
        lo,hi=s.R,0; sl=s.sl
        for t in range(sl.ntgt):
            a,b=sl.off[t],sl.off[t]+sl.cnt[t]
            if sl.cnt[t]>0 and a<n0+BN and b>n0: lo=min(lo,t*s.r); hi=max(hi,t*s.r+s.r)
        return lo,hi
    def epilogue(s,m,n0,c1,c2):
        if m>=s.M: return
        for i in range(8):
            n=n0+i
            if n<s.N:
                acc=c1[i]+s.s*c2[i]
                if s.b is not None: acc+=s.b[n]
                s.y[m,n]=acc

class Dx:
    A1K=True; B1K=False; HAS2=True; A2K=True; B2K=False
    def __init__(s,g,W,dh,A,dx,d): s.g,s.W,s.dh,s.A,s.dx,s.d=g,W,dh,A,dx,d; s.M,s.N=g.shape; s.K=W.shape[1]; s.R=A.shape[0]
    def a1(s,m,n0):
        if m>=s.M: return np.zeros(8,np.float32)
        return load8(lambda i: s.g[m,i],n0,0,s.N)
    def b1(s,n,k0):
        if n>=s.N: return np.zeros(8,np.float32)
        return load8(lambda i: s.W[n,i],k0,0,s.K)
    def a2(s,m,j0):
        if m>=s.M: return np.zeros(8,np.float32)
        return load8(lambda i: s.dh[m,i],j0,0,s.R)
    def b2(s,j,k0):
        if j>=s.R: return np.zeros(8,np.float32)
        return load8(lambda i: s.A[j,i],k0,0,s.K)
    def range1(s,z): return 0,s.N
    def range2(s,n0): return 0,s.R
    def epilogue(s,m,k0,c1,c2):
        if m>=s.M: return
        bits=keep8(s.d,m,k0>>3); sc=s.d.inv if s.d.on else 1.0
        for i in range(8):
            k=k0+i
            if k<s.K: s.dx[m,k]=c1[i]+(c2[i]*sc if (bits>>i)&1 else 0.0)

class Da:
    A1K=B1K=False; HAS2=False
    def __init__(s,dh,x,dA32,d,rows): s.dh,s.x,s.dA32,s.d,s.rows=dh,x,dA32,d,rows; s.M,s.K=x.shape; s.R=dh.shape[1]
    def a1(s,m,j0):
        if m>=s.M: return np.zeros(8,np.float32)
        return load8(lambda i: s.dh[m,i],j0,0,s.R)
    def b1(s,m,k0):
        if m>=s.M: return np.zeros(8,np.float32)
        v=load8(lambda i: s.x[m,i],k0,0,s.K); return apply_keep(v,keep8(s.d,m,k0>>3))
    def range1(s,z): lo=z*s.rows; return lo,min(s.M,lo+s.rows)
    def epilogue(s,j,k0,c1,c2):
        if j>=s.R: return
        for i in range(8):
            if k0+i<s.K: s.dA32[j,k0+i]+=c1[i]

def dh_db(g,h,B,r,sl,s):
    M,N=g.shape; R=sl.ntgt*r; dh=np.full((M,R),np.nan,np.float32); dB32=np.zeros((B.shape[0],r),np.float32)
    BMv,RMAX=(128,32) if r<=32 else (32,128)   # the launcher's choice
    kTm=BMv//16
    rp=cdiv(r,16)*16
    assert kTm*(rp//16)<=16 and 2*(rp//16)<=16
    for bx in range(cdiv(M,BMv)):
        m0=bx*BMv
        for t in range(sl.ntgt):
            off,cnt,boff=sl.off[t],sl.cnt[t],sl.boff[t]
            Hs=np.zeros((BMv,rp),np.float32)
            for e in range(BMv*rp):
                m,j=e//rp,e%rp; Hs[m,j]=h[m0+m,t*r+j] if (m0+m<M and j<r) else 0
            dacc=np.zeros((BMv,rp),np.float32)
            nb=0
            while nb<cnt:
                Gs=np.zeros((BMv,32),np.float32); Bs=np.zeros((32,rp),np.float32)
                for e in range(BMv*32):
                    m,nn=e//32,e%32; Gs[m,nn]=g[m0+m,off+nb+nn] if (m0+m<M and nb+nn<cnt) else 0
                for e in range(32*rp):
                    nn,j=e//rp,e%rp; Bs[nn,j]=B[boff+nb+nn,j] if (nb+nn<cnt and j<r) else 0
                for tile in range(kTm*(rp//16)):   # the warps' dh tiles
                    tm,tj=tile%kTm,tile//kTm
                    dacc[tm*16:tm*16+16,tj*16:tj*16+16]+=Gs[tm*16:tm*16+16,:]@Bs[:,tj*16:tj*16+16]
                Cs=np.full((BMv,rp),np.nan,np.float32)
                for tile in range(2*(rp//16)):      # the warps' dB tiles
                    tn,tj=tile&1,tile>>1
                    Cs[tn*16:tn*16+16,tj*16:tj*16+16]=Gs[:,tn*16:tn*16+16].T@Hs[:,tj*16:tj*16+16]
                for e in range(32*r):
                    nn,j=e//r,e%r
                    if nb+nn<cnt: dB32[boff+nb+nn,j]+=Cs[nn,j]
                nb+=32
            for e in range(BMv*r):
                m,j=e//r,e%r
                if m0+m<M: dh[m0+m,t*r+j]=s*dacc[m,j]
    return dh,dB32

def run_all(M,K,N,r,slices,p,seed=12345,bias=True,nsms=132):
    rng=np.random.default_rng(0); sl=Slices(slices); T=sl.ntgt; R=T*r
    f=lambda *s: rng.standard_normal(s).astype(np.float32)
    x,W,A,B=f(M,K),f(N,K),f(R,K),f(sum(sl.cnt),r); b=f(N) if bias else None; s=0.7
    d=Drop(seed,p)
    h=np.full((M,R),np.nan,np.float32); y=np.full((M,N),np.nan,np.float32)
    gemm(Down(x,A,h,d),(cdiv(M,BM),cdiv(R,BN),1))
    gemm(Main(x,W,b,h,B,y,r,sl,s),(cdiv(M,BM),cdiv(N,BN),1))
    keep=np.array([[ (keep8(d,m,k>>3)>>(k&7))&1 for k in range(K)] for m in range(M)],bool)
    # reference
    xd=x*keep/(1-p) if p>0 else x
    h_ref=xd@A.T; y_ref=x@W.T+(b if bias else 0)
    for t in range(T):
        y_ref[:,sl.off[t]:sl.off[t]+sl.cnt[t]]+=s*h_ref[:,t*r:(t+1)*r]@B[sl.boff[t]:sl.boff[t]+sl.cnt[t]].T
    assert np.allclose(h,h_ref,atol=1e-3,rtol=1e-3), np.abs(h-h_ref).max()
    assert np.allclose(y,y_ref,atol=1e-3,rtol=1e-3), np.abs(y-y_ref).max()
    g=f(M,N)
    dh,dB32=dh_db(g,h,B,r,sl,s)
    dh_ref=np.zeros((M,R),np.float32); dB_ref=np.zeros_like(B)
    for t in range(T):
        gt=g[:,sl.off[t]:sl.off[t]+sl.cnt[t]]; Bt=B[sl.boff[t]:sl.boff[t]+sl.cnt[t]]
        dh_ref[:,t*r:(t+1)*r]=s*gt@Bt; dB_ref[sl.boff[t]:sl.boff[t]+sl.cnt[t]]=s*gt.T@h_ref[:,t*r:(t+1)*r]
    assert np.allclose(dh,dh_ref,atol=1e-3,rtol=1e-3)
    assert np.allclose(dB32*s,dB_ref,atol=1e-2,rtol=1e-3)
    dx=np.full((M,K),np.nan,np.float32)
    gemm(Dx(g,W,dh,A,dx,d),(cdiv(M,BM),cdiv(K,BN),1))
    inv=1/(1-p) if p>0 else 1
    dx_ref=g@W+(dh_ref@A)*keep*inv
    assert np.allclose(dx,dx_ref,atol=1e-2,rtol=1e-3), np.abs(dx-dx_ref).max()
    dA32=np.zeros((R,K),np.float32)
    tiles=cdiv(R,BM)*cdiv(K,BN); splits=max(1,min(cdiv(M,256),cdiv(4*nsms,tiles))); rows=cdiv(cdiv(M,splits),BK)*BK; splits=cdiv(M,rows)
    gemm(Da(dh,x,dA32,d,rows),(cdiv(R,BM),cdiv(K,BN),splits))
    dA_ref=dh_ref.T@(x*keep)*inv
    assert np.allclose(dA32*inv,dA_ref,atol=1e-2,rtol=1e-3), np.abs(dA32*inv-dA_ref).max()
    print("ok",M,K,N,r,slices,p,"splits",splits, "kept",keep.mean())

if __name__=="__main__":
    run_all(37,72,100,4,[0,100],0.0)
    run_all(70,80,160,8,[0,50,80,30],0.25)
    run_all(65,96,33,20,[0,33],0.1,bias=False)
    run_all(600,40,96,8,[0,32,32,32,64,32],0.3,nsms=4)
    run_all(130,200,70,1,[0,70],0.5)
    run_all(50,100,70,16,[0,70],0.1)          # K not a multiple of 8
    run_all(40,64,48,128,[0,48],0.2)          # the largest rank
    run_all(33,24,60,5,[20,20],0.15,bias=False)  # one target in the middle (k only)
    run_all(300,48,100,32,[0,40,60,40],0.2)   # r = 32: the 128-row dh/dB block, 3 row blocks
    run_all(70,48,100,33,[0,100],0.2)         # r = 33: the 32-row block
